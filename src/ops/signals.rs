//! Graceful shutdown on SIGTERM or SIGINT: the first signal cancels the returned token (the
//! runtime stops reading, drains, checkpoints and releases its leases); a second one exits the
//! process at once, for an operator who cannot wait.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// A token cancelled at the first SIGTERM or SIGINT; the second exits the process with status
/// 130. Call from inside a tokio runtime; pass the token to `Runtime::with_shutdown`.
///
/// # Errors
/// The signal handlers could not be installed.
pub fn shutdown_on_signals() -> std::io::Result<CancellationToken> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown requested: draining, checkpointing, releasing leases (signal again to exit now)");
        cancel.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(130);
    });
    Ok(token)
}
