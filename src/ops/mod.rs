//! Running a worker in production: the operations HTTP endpoint (`/metrics`, `/healthz`, `/readyz`) and
//! graceful shutdown on SIGTERM/SIGINT.

mod http;
mod signals;

pub use http::{serve, OpsServer};
pub use signals::shutdown_on_signals;
