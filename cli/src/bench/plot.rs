//! `--plot FILE.png`: latency distributions per system as empirical CDFs, drawn with
//! plotters' bitmap backend. Text goes through ab_glyph with a TTF read at run time (Debian's
//! fonts-dejavu-core), so neither the build nor the binary depends on system font libraries.
use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where the font is looked for after `$SHOJI_FONT`.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Series colours (colour-blind safe: blue, orange, green).
const COLORS: &[RGBColor] = &[RGBColor(0, 114, 178), RGBColor(230, 159, 0), RGBColor(0, 158, 115)];

static FONT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Registers the TTF as plotters' "sans-serif" once; checked before any run so a missing font
/// does not cost a whole bench.
pub fn load_font() -> Result<PathBuf> {
    let r = FONT.get_or_init(|| {
        let env = std::env::var_os("SHOJI_FONT").filter(|p| !p.is_empty()).map(PathBuf::from);
        let path = env.clone().or_else(|| FONTS.iter().map(PathBuf::from).find(|p| p.is_file())).ok_or_else(|| {
            "plot: no TTF font found (install Debian's fonts-dejavu-core, or set SHOJI_FONT to a .ttf)".to_string()
        })?;
        let bytes = std::fs::read(&path).map_err(|e| format!("plot: font {}: {e}", path.display()))?;
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("plot: font {}: not a usable TTF", path.display()))?;
        Ok(path)
    });
    r.clone().map_err(|e| anyhow!(e))
}

/// The points of an empirical CDF drawn as steps: (x, fraction of values <= x).
pub fn ecdf_steps(values: &[f64]) -> Vec<(f64, f64)> {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len() as f64;
    let mut pts = Vec::with_capacity(v.len() * 2);
    for (i, &x) in v.iter().enumerate() {
        pts.push((x, i as f64 / n));
        pts.push((x, (i + 1) as f64 / n));
    }
    pts
}

/// 1-2-5 ticks from `lo` to `hi` (a log axis's own are powers of ten, too few for one decade).
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut v = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let t = decade * m;
            if (lo..=hi).contains(&t) {
                v.push(t);
            }
        }
        decade *= 10.0;
    }
    v
}

/// Draws one CDF per system (name, samples in ms) on a log-scale latency axis.
pub fn draw(path: &Path, title: &str, systems: &[(&str, &[f64])]) -> Result<()> {
    load_font()?;
    let all: Vec<f64> = systems.iter().flat_map(|s| s.1.iter().copied()).filter(|v| *v > 0.0).collect();
    if all.is_empty() {
        bail!("no samples to plot");
    }
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min) / 1.25;
    let hi = all.iter().copied().fold(0.0, f64::max) * 1.25;
    let err = |e: &dyn std::fmt::Display| anyhow!("{e}");
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale().with_key_points(ticks(lo, hi)), 0f64..1.0)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (log scale)")
        .y_desc("fraction of runs at or below")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, values)) in systems.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let p50 = super::stats::Summary::of(values).map(|s| s.p50).unwrap_or(0.0);
        chart
            .draw_series(LineSeries::new(ecdf_steps(values), color.stroke_width(3)))
            .map_err(|e| err(&e))?
            .label(format!("{name}: p50 {p50:.1} ms, n = {}", values.len()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 18))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e)).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdf_steps_rise_by_one_over_n_at_each_sorted_value() {
        assert_eq!(ecdf_steps(&[2.0, 1.0]), [(1.0, 0.0), (1.0, 0.5), (2.0, 0.5), (2.0, 1.0)]);
        assert!(ecdf_steps(&[]).is_empty());
        assert_eq!(ticks(8.0, 300.0), [10.0, 20.0, 50.0, 100.0, 200.0]);
    }
}
