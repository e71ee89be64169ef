//! Where the progress bars of training, generation and verification draw.
//!
//! On a terminal, indicatif's bar on stderr. Anywhere else (a log file, `nohup`, CI) indicatif
//! would draw nothing at all, so a half-hour run written to a file showed no sign of life until
//! it ended; there the bar's line is written as a plain line instead, at most once per
//! [`LOG_EVERY`] (the first draw at once).

use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressDrawTarget, TermLike};

/// The interval between two progress lines when stderr is not a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// The draw target of a bar: hidden unless `enabled`; stderr's bar on a terminal; otherwise a
/// line on stderr every [`LOG_EVERY`].
pub fn draw_target(enabled: bool) -> ProgressDrawTarget {
    if !enabled {
        ProgressDrawTarget::hidden()
    } else if io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::term_like_with_hz(Box::new(LogLines::new(io::stderr(), LOG_EVERY)), 1)
    }
}

/// A [`TermLike`] that keeps the bar's latest text and writes it as one line per `every`.
pub struct LogLines<W> {
    every: Duration,
    state: Mutex<LogState<W>>,
}

struct LogState<W> {
    out: W,
    /// What the bar drew since its last flush.
    line: String,
    last: Option<Instant>,
}

impl<W> std::fmt::Debug for LogLines<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLines")
            .field("every", &self.every)
            .finish()
    }
}

impl<W: Write + Send> LogLines<W> {
    pub fn new(out: W, every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new(LogState {
                out,
                line: String::new(),
                last: None,
            }),
        }
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut LogState<W>) -> T) -> T {
        f(&mut self.state.lock().expect("progress log poisoned"))
    }
}

impl<W: Write + Send> TermLike for LogLines<W> {
    fn width(&self) -> u16 {
        // Wide enough that indicatif never truncates the message.
        200
    }

    fn move_cursor_up(&self, _: usize) -> io::Result<()> {
        Ok(())
    }

    fn move_cursor_down(&self, _: usize) -> io::Result<()> {
        Ok(())
    }

    fn move_cursor_right(&self, _: usize) -> io::Result<()> {
        Ok(())
    }

    fn move_cursor_left(&self, _: usize) -> io::Result<()> {
        Ok(())
    }

    fn write_line(&self, s: &str) -> io::Result<()> {
        self.write_str(s)
    }

    fn write_str(&self, s: &str) -> io::Result<()> {
        self.with_state(|st| {
            if !st.line.is_empty() && !s.is_empty() {
                st.line.push(' ');
            }
            st.line.push_str(s.trim_end());
        });
        Ok(())
    }

    fn clear_line(&self) -> io::Result<()> {
        self.with_state(|st| st.line.clear());
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let every = self.every;
        self.with_state(|st| {
            let line = std::mem::take(&mut st.line);
            let due = st.last.is_none_or(|t| t.elapsed() >= every);
            if line.trim().is_empty() || !due {
                return Ok(());
            }
            st.last = Some(Instant::now());
            writeln!(st.out, "{}", line.trim())?;
            st.out.flush()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn draw(t: &dyn TermLike, s: &str) {
        t.clear_line().unwrap();
        t.write_str(s).unwrap();
        t.flush().unwrap();
    }

    #[test]
    fn the_first_draw_is_written_and_later_ones_once_per_interval() {
        let out = Shared::default();
        let slow = LogLines::new(out.clone(), Duration::from_secs(3600));
        draw(&slow, "step 1/10 [=>   ]");
        draw(&slow, "step 2/10 [==>  ]");
        draw(&slow, "");
        assert_eq!(out.text(), "step 1/10 [=>   ]\n");

        let out = Shared::default();
        let every = LogLines::new(out.clone(), Duration::ZERO);
        draw(&every, "a");
        every.write_line("b").unwrap();
        every.write_str("c  ").unwrap();
        every.flush().unwrap();
        // A cleared, empty redraw (finish_and_clear) writes nothing.
        draw(&every, "");
        assert_eq!(out.text(), "a\nb c\n");
    }

    #[test]
    fn a_bar_drawn_into_a_log_shows_its_position() {
        let out = Shared::default();
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(4),
            ProgressDrawTarget::term_like(Box::new(LogLines::new(out.clone(), Duration::ZERO))),
        );
        bar.set_style(indicatif::ProgressStyle::with_template("{pos}/{len} {msg}").unwrap());
        bar.set_message("working");
        bar.inc(3);
        bar.finish();
        assert!(out.text().contains("3/4 working"), "{:?}", out.text());
    }
}
