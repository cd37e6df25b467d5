//! Tumbling windows: fixed size, no overlap, aligned to the epoch.

use std::time::Duration;

use shardflow_core::position::EventTime;
use shardflow_core::sink::Window;

use super::{aligned_start, clamped, millis, WindowAssigner};

/// Windows of a fixed size that do not overlap: `[0, size)`, `[size, 2 size)`, ...
#[derive(Clone, Copy, Debug)]
pub struct TumblingWindow {
    size: i64,
}

impl TumblingWindow {
    /// Windows of `size`.
    ///
    /// # Panics
    /// If `size` is under a millisecond.
    pub fn of(size: Duration) -> Self {
        let size = millis(size);
        assert!(size > 0, "a tumbling window is at least 1 ms long");
        Self { size }
    }
}

impl WindowAssigner for TumblingWindow {
    fn describe(&self) -> String {
        format!("window-tumbling-{}", super::span(self.size))
    }

    fn assign(&self, t: EventTime, out: &mut Vec<Window>) {
        out.push(self.window_of(t));
    }

    #[inline]
    fn single(&self, t: EventTime) -> Option<Window> {
        Some(self.window_of(t))
    }
}

impl TumblingWindow {
    #[inline]
    fn window_of(&self, t: EventTime) -> Window {
        let start = aligned_start(t, self.size);
        clamped(start, start + i128::from(self.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_fall_in_the_window_that_contains_them() {
        let w = TumblingWindow::of(Duration::from_secs(1));
        let mut out = Vec::new();
        for (t, start) in [(0, 0), (999, 0), (1000, 1000), (-1, -1000)] {
            out.clear();
            w.assign(t, &mut out);
            assert_eq!(out, [Window::new(start, start + 1000)], "event time {t}");
        }
    }
}
