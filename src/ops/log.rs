//! The log writer: text lines (default) or one JSON object per line
//! (`log.format = "json"`, `serve --log-format json`), on stderr, written by a
//! background thread so a request never waits on it, in batches.

use std::io::IsTerminal;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Install the global subscriber; keep the guard alive until exit (it flushes).
pub fn init(format: LogFormat) -> WorkerGuard {
    // Lines are not dropped when the writer falls behind. The background thread
    // drains every line waiting and then flushes: under load one write(2) carries
    // many lines instead of one each (stderr itself is unbuffered).
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("moonbit_registry=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // Event fields at the top level, beside `timestamp`, `level` and `target`,
        // so log shippers need no nested paths.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    guard
}
