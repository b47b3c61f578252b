//! `cargo bench --bench gateway`: the gateway side by side with nginx, the upstream
//! and `git http-backend` (see `side_by_side`). A benchmark, not a test: `cargo test`
//! never runs it. Peers are installed by `benches/peers.sh` when missing.

// The integration tests' harness; this benchmark uses only part of it.
#[allow(dead_code, unused_imports)]
#[path = "../tests/it/upstream/mod.rs"]
mod upstream;

mod side_by_side;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    side_by_side::run().await;
}
