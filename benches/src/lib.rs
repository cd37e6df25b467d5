//! shardflow's criterion micro-benchmarks live in `benches/hot_paths.rs`: `cargo bench -p
//! shardflow-benches`. This library is empty; the package exists so that criterion is a
//! dependency of nothing a user builds.
