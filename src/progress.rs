//! Progress of the long-running commands (`warm`, `export`, `cache verify`): a
//! live bar with count, bytes, rate and ETA on a terminal (indicatif), plain log
//! lines otherwise, so CI logs stay readable.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Reports items done out of a known count, and bytes moved.
pub struct Progress {
    bar: Option<ProgressBar>,
    verb: &'static str,
    started: Instant,
    total: u64,
}

impl Progress {
    /// `verb` names what is done to each item (e.g. "fetching").
    pub fn new(verb: &'static str, total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{prefix:>10.cyan.bold} [{bar:30}] {pos}/{len} {msg}, eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(verb);
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Progress {
            bar,
            verb,
            started: Instant::now(),
            total,
        }
    }

    /// `so_far` bytes moved in total: shown with the rate beside the count (the
    /// bar itself counts items, as sizes are not known before the downloads).
    pub fn bytes(&self, so_far: u64) {
        if let Some(bar) = &self.bar {
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let rate = ByteSize((so_far as f64 / secs) as u64);
            bar.set_message(format!("{}, {rate}/s", ByteSize(so_far)));
        }
    }

    /// One item finished; `line` describes it (printed as a line when not on a terminal).
    pub fn item(&self, done: u64, line: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                if line.starts_with("failed") {
                    bar.println(line);
                }
            }
            None => eprintln!("{} [{done}/{}] {line}", self.verb, self.total),
        }
    }

    pub fn finish(&self) -> Duration {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.started.elapsed()
    }
}
