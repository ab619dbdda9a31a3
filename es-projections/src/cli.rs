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
            "{msg} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} events ({eta} left)",
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use es_core::Position;

    use super::*;

    #[test]
    fn the_bar_follows_the_rebuild() {
        let reporter = ProgressBarReporter::with_bar(ProgressBar::hidden());
        reporter.start(100);
        reporter.progress(40, 100);
        assert_eq!(reporter.position(), 40);
        // The log grew during the replay: the bar grows with it.
        reporter.progress(120, 120);
        assert_eq!(reporter.bar.length(), Some(120));
        reporter.finish(&RebuildReport {
            events: 120,
            caught_up_in_swap: 0,
            position: Position::new(1, 120),
            dead_letters: 0,
            elapsed: Duration::from_secs(1),
        });
        assert!(reporter.bar.is_finished());
    }
}
