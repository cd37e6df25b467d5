//! Sliding windows: fixed size, a new window every `slide`, so windows overlap.

use std::time::Duration;

use shardflow_core::position::EventTime;
use shardflow_core::sink::Window;

use super::{millis, WindowAssigner};

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
    fn assign(&self, t: EventTime, out: &mut Vec<Window>) {
        let last_start = t - t.rem_euclid(self.slide);
        let mut start = last_start;
        while start > t - self.size {
            out.push(Window::new(start, start + self.size));
            start -= self.slide;
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
