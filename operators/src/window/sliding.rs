//! Sliding windows: fixed size, a new window every `slide`, so windows overlap.

use std::time::Duration;

use shardflow_core::position::EventTime;
use shardflow_core::sink::Window;

use super::{aligned_start, clamped, millis, WindowAssigner};

/// Windows of `size` starting every `slide`; a record belongs to `size / slide` of them.
#[derive(Clone, Copy, Debug)]
pub struct SlidingWindow {
    size: i64,
    slide: i64,
}

impl SlidingWindow {
    /// Windows of `size` every `slide`.
    ///
    /// # Panics
    /// If `slide` is under a millisecond or longer than `size`.
    pub fn of(size: Duration, slide: Duration) -> Self {
        let (size, slide) = (millis(size), millis(slide));
        assert!(
            slide > 0 && slide <= size,
            "a sliding window needs 0 < slide <= size"
        );
        Self { size, slide }
    }
}

impl WindowAssigner for SlidingWindow {
    fn describe(&self) -> String {
        format!(
            "window-sliding-{}-every-{}",
            super::span(self.size),
            super::span(self.slide)
        )
    }

    fn assign(&self, t: EventTime, out: &mut Vec<Window>) {
        let mut start = aligned_start(t, self.slide);
        let (size, slide) = (i128::from(self.size), i128::from(self.slide));
        while start > i128::from(t) - size {
            out.push(clamped(start, start + size));
            start -= slide;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_belongs_to_size_over_slide_windows() {
        let w = SlidingWindow::of(Duration::from_secs(3), Duration::from_secs(1));
        let mut out = Vec::new();
        w.assign(2500, &mut out);
        out.sort();
        assert_eq!(
            out,
            [
                Window::new(0, 3000),
                Window::new(1000, 4000),
                Window::new(2000, 5000)
            ]
        );
        for w in &out {
            assert!(w.start <= 2500 && 2500 < w.end);
        }
    }
}
