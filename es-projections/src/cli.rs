//! Terminal helpers: a progress bar for rebuilds.

use indicatif::{ProgressBar, ProgressStyle};

use crate::postgres::{RebuildProgress, RebuildReport};

/// Shows a rebuild's progress as an indicatif progress bar (events replayed
/// of the total, rate, time left), then a one-line summary.
#[derive(Debug)]
pub struct ProgressBarReporter {
    bar: ProgressBar,
}

impl Default for ProgressBarReporter {
    fn default() -> Self {
        Self::new()
    }
}

impl ProgressBarReporter {
    /// A bar drawn on standard error.
    pub fn new() -> Self {
        Self::with_bar(ProgressBar::new(0))
    }

    /// A bar you made (a hidden one in tests, one in a `MultiProgress`).
    pub fn with_bar(bar: ProgressBar) -> Self {
        let style = ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} events ({per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message("rebuilding");
        Self { bar }
    }

    /// The bar's position: events replayed so far.
    pub fn position(&self) -> u64 {
        self.bar.position()
    }
}

impl RebuildProgress for ProgressBarReporter {
    fn start(&self, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(0);
    }

    fn progress(&self, done: u64, total: u64) {
        if total > self.bar.length().unwrap_or(0) {
            self.bar.set_length(total);
        }
        self.bar.set_position(done);
    }

    fn finish(&self, report: &RebuildReport) {
        self.bar.finish_with_message(format!(
            "rebuilt: {} events in {:.1?}, swapped in at {}",
            report.events, report.elapsed, report.position
        ));
    }
}
