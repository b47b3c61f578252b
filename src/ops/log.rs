//! The log writer: text lines (default) or one JSON object per line
//! (`log.format = "json"`, `serve --log-format json`), on stderr, written by a
//! background thread so a request never waits on it.
//!
//! Lines are appended to a shared buffer; the writer thread is woken only when it
//! is idle, and after each write it pauses briefly so that, under load, one
//! `write(2)` carries every line that came meanwhile. A wake-up and a system call
//! per line (a channel to a writer thread, as `tracing-appender` does) cost a
//! busy gateway more CPU than the requests it logs. A line reaches stderr within
//! a few milliseconds; none is dropped (past a bound, loggers wait).

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// After a write, the writer thread waits this long for more lines to batch.
const BATCH_PAUSE: Duration = Duration::from_millis(2);
/// Past this many bytes waiting (stderr not keeping up), a thread logging waits
/// for the writer thread to take them: lines are delayed, never dropped.
const BACKLOG_MAX: usize = 8 << 20;

/// Install the global subscriber; keep the guard alive until exit (it flushes).
pub fn init(format: LogFormat) -> Guard {
    let shared = Arc::new(Shared::default());
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || shared.run(std::io::stderr()))
            .ok()
    };
    let writer = Lines(shared.clone());
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
    Guard { shared, thread }
}

/// Flushes every line still waiting and stops the writer thread when dropped.
pub struct Guard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_one();
        self.shared.taken.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // No writer thread (it could not be started): write what is left here.
        let rest = std::mem::take(&mut self.shared.lock().lines);
        let _ = std::io::stderr().write_all(&rest);
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when lines arrive for an idle writer thread, or at shutdown.
    wake: Condvar,
    /// Signalled when the writer thread has taken the lines waiting.
    taken: Condvar,
}

#[derive(Default)]
struct State {
    lines: Vec<u8>,
    /// The writer thread waits for a signal (rather than pausing between batches).
    idle: bool,
    stopping: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn append(&self, line: &[u8]) {
        let mut state = self.lock();
        while state.lines.len() > BACKLOG_MAX && !state.stopping {
            state = self.taken.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.lines.extend_from_slice(line);
        if state.idle {
            state.idle = false;
            self.wake.notify_one();
        }
    }

    /// The writer thread: write what has come, pause, repeat; sleep when idle.
    fn run(&self, mut out: impl Write) {
        let mut batch = Vec::new();
        loop {
            let stopping = {
                let mut state = self.lock();
                while state.lines.is_empty() && !state.stopping {
                    state.idle = true;
                    state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                state.idle = false;
                std::mem::swap(&mut batch, &mut state.lines);
                self.taken.notify_all();
                state.stopping
            };
            let _ = out.write_all(&batch);
            let _ = out.flush();
            batch.clear();
            if stopping && self.lock().lines.is_empty() {
                return;
            }
            std::thread::sleep(BATCH_PAUSE);
        }
    }
}

/// The subscriber's writer: each formatted event is one `write` of a whole line.
struct Lines(Arc<Shared>);

impl Write for &Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Lines {
    type Writer = &'a Lines;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Collects what the writer thread writes, and how many writes it took.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>, Arc<AtomicUsize>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            self.1.fetch_add(1, Ordering::Relaxed);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_whole_in_order_batched_and_promptly() {
        let shared = Arc::new(Shared::default());
        let sink = Sink::default();
        let thread = {
            let (shared, sink) = (shared.clone(), sink.clone());
            std::thread::spawn(move || shared.run(sink))
        };
        let started = std::time::Instant::now();
        for i in 0..10_000 {
            shared.append(format!("line {i}\n").as_bytes());
        }
        // Promptly: well before any test would give up waiting for a line.
        while !String::from_utf8_lossy(&sink.0.lock().unwrap()).contains("line 9999\n") {
            assert!(started.elapsed() < Duration::from_secs(1), "lines are late");
            std::thread::sleep(Duration::from_millis(1));
        }
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let expected: String = (0..10_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
        assert!(
            sink.1.load(Ordering::Relaxed) < 1_000,
            "{} writes for 10,000 lines",
            sink.1.load(Ordering::Relaxed)
        );
        shared.lock().stopping = true;
        shared.wake.notify_one();
        thread.join().unwrap();
    }
}
