//! The agent binary: a placeholder until the agent's server and init duties land; the device
//! handling lives in the library (`shoji_agent::device`).

fn main() {}
