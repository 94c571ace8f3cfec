//! The `shoji` CLI's library part: what its fuzz targets reach. The commands live in the binary.
pub mod layer;
