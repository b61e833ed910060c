//! The terminal view of a build, drawn as BuildKit's `--progress tty`: a header, one line per
//! step seen so far, and the last few log lines of each running step beneath it.
//!
//! ```text
//! [+] Building 3.2s (4/7)
//!  => CACHED [stage-0 1/3] FROM busybox                                  0.0s
//!  => [stage-0 2/3] COPY src/ /app/                                      0.1s
//!  => [stage-0 3/3] RUN make                                             1.3s
//!  => => # cc -c main.c
//! ```
//!
//! indicatif does the drawing: cursor movement, the redraw rate, and cutting lines to the
//! terminal's width (`{wide_msg}`). This module only decides what each line says. Every screen
//! line is one bar of a [`MultiProgress`], so a step's log lines can be inserted under it and
//! removed again when it is done.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use memobuild_protocol::{BuildEvent, BuildEventKind};

/// BuildKit redraws about this often; more only costs CPU on slow terminals and SSH links.
pub(super) const REDRAW_HZ: u8 = 10;
/// How often running timers advance on screen.
const TICK: Duration = Duration::from_millis(100);
/// Log lines kept under a running step (BuildKit shows about as many).
const TAIL_LINES: usize = 6;
/// A log line is cut to this many characters before it is stored: no terminal is wider, and a
/// megabyte-long line without a newline must not be re-measured on every redraw.
const MAX_LINE_CHARS: usize = 1024;

/// Everything on screen, updated by events; dropping it leaves the last frame on the terminal.
#[derive(Debug)]
pub(super) struct TtyView {
    multi: MultiProgress,
    header: ProgressBar,
    names: HashMap<u32, String>,
    steps: HashMap<u32, Step>,
}

/// One step's line and the log lines drawn under it while it runs.
#[derive(Debug)]
struct Step {
    name: String,
    bar: ProgressBar,
    tail: VecDeque<String>,
    tail_bars: Vec<ProgressBar>,
    finished: bool,
}

impl TtyView {
    pub(super) fn new(target: ProgressDrawTarget) -> Self {
        let multi = MultiProgress::with_draw_target(target);
        let header = multi.add(ProgressBar::no_length().with_style(header_style()));
        header.enable_steady_tick(TICK);
        let view = Self {
            multi,
            header,
            names: HashMap::new(),
            steps: HashMap::new(),
        };
        view.update_header("");
        view
    }

    pub(super) fn event(&mut self, event: &BuildEvent) {
        let n = event.node;
        match &event.kind {
            BuildEventKind::Queued { name } => {
                self.names.insert(n, printable(name.as_bytes()));
            }
            // Only running steps tick: a cached step needs no timer thread.
            BuildEventKind::Started => self.step(n).bar.enable_steady_tick(TICK),
            BuildEventKind::Cached => self.step(n).finish("CACHED ", Duration::ZERO, done_style()),
            BuildEventKind::Log { line, .. } => {
                // Lines for a step that never started or already ended have no place on screen.
                if let Some(step) = self.steps.get_mut(&n).filter(|step| !step.finished) {
                    step.log(&self.multi, line);
                }
            }
            BuildEventKind::Done { duration_ms } => {
                if let Some(step) = self.steps.get_mut(&n) {
                    step.clear_tail(&self.multi);
                    let took = Duration::from_millis(*duration_ms);
                    step.finish("", took, done_style());
                }
            }
            BuildEventKind::Failed { message } => {
                // A handle to the same screen, so that the step can be borrowed mutably.
                let multi = self.multi.clone();
                self.step(n).fail(&multi, message);
            }
            // The screen has no room for it; `--explain` prints it after the build.
            BuildEventKind::Reason { .. } => {}
            BuildEventKind::Warning { message } => {
                let _ = self.multi.println(format!("WARNING: {message}"));
            }
            BuildEventKind::Prebuilt { ago_ms, joined } => {
                let label = format!("{} ", super::prebuilt(*ago_ms, *joined));
                self.step(n).finish(&label, Duration::ZERO, done_style());
            }
        }
        self.update_header("");
    }

    /// Marks the build as over; dropping the view then draws the final frame.
    pub(super) fn finish(self) {
        self.update_header(" FINISHED");
    }

    /// The step's line, added at the bottom of the screen the first time the step is seen.
    fn step(&mut self, n: u32) -> &mut Step {
        let name = self.names.get(&n);
        self.steps.entry(n).or_insert_with(|| {
            let name = name.cloned().unwrap_or_else(|| format!("#{n}"));
            Step::start(&self.multi, name)
        })
    }

    fn update_header(&self, suffix: &str) {
        let done = self.steps.values().filter(|step| step.finished).count();
        let total = self.names.len().max(self.steps.len());
        self.header.set_message(format!("({done}/{total}){suffix}"));
    }
}

/// Draws the final frame and lets go of the terminal, whether the build ended or failed: every
/// bar is finished first, so no timer redraws over what is printed next, and the header stays
/// (indicatif 0.18 erases a multi-bar's first line when it is dropped unfinished).
impl Drop for TtyView {
    fn drop(&mut self) {
        // A step still running when the build ends keeps its last time and lines on screen.
        for step in self.steps.values().filter(|step| !step.finished) {
            step.bar.abandon();
            for bar in &step.tail_bars {
                bar.abandon();
            }
        }
        self.header.finish();
    }
}

impl Step {
    fn start(multi: &MultiProgress, name: String) -> Self {
        let bar = multi.add(ProgressBar::no_length().with_style(running_style()));
        bar.set_message(format!(" => {name}"));
        Self {
            name,
            bar,
            tail: VecDeque::new(),
            tail_bars: Vec::new(),
            finished: false,
        }
    }

    fn log(&mut self, multi: &MultiProgress, line: &[u8]) {
        self.tail.push_back(printable(line));
        if self.tail.len() > TAIL_LINES {
            self.tail.pop_front();
        }
        while self.tail_bars.len() < self.tail.len() {
            let bar = self.add_line(multi, log_style());
            self.tail_bars.push(bar);
        }
        for (bar, line) in self.tail_bars.iter().zip(&self.tail) {
            bar.set_message(format!(" => => # {line}"));
        }
    }

    /// A new screen line under the step and its log lines.
    fn add_line(&self, multi: &MultiProgress, style: ProgressStyle) -> ProgressBar {
        let below = self.tail_bars.last().unwrap_or(&self.bar);
        multi.insert_after(below, ProgressBar::no_length().with_style(style))
    }

    fn clear_tail(&mut self, multi: &MultiProgress) {
        self.tail.clear();
        for bar in self.tail_bars.drain(..) {
            bar.finish_and_clear();
            multi.remove(&bar);
        }
    }

    /// BuildKit keeps a failed step's output on screen: it is usually why the step failed.
    fn fail(&mut self, multi: &MultiProgress, message: &str) {
        let took = self.bar.elapsed();
        self.finish("ERROR ", took, error_style());
        // Only the first line, as in plain mode: the rest is usually the step's output, which is
        // already on screen above and which the client prints again with the build's error.
        let first = message.lines().next().unwrap_or_default();
        let bar = self.add_line(multi, error_style());
        bar.finish_with_message(format!(" => => # {}", printable(first.as_bytes())));
        self.tail_bars.push(bar);
        for bar in &self.tail_bars {
            bar.finish();
        }
    }

    fn finish(&mut self, label: &str, took: Duration, style: ProgressStyle) {
        self.finished = true;
        self.bar.set_style(style);
        self.bar.set_prefix(seconds(took));
        self.bar
            .finish_with_message(format!(" => {label}{}", self.name));
    }
}

fn header_style() -> ProgressStyle {
    template("[+] Building {elapsed_s} {msg}").with_key("elapsed_s", elapsed_seconds)
}

/// The time sits at the right edge, as in BuildKit: `{wide_msg}` takes the rest of the width.
fn running_style() -> ProgressStyle {
    template("{wide_msg} {elapsed_s}").with_key("elapsed_s", elapsed_seconds)
}

fn done_style() -> ProgressStyle {
    template("{wide_msg} {prefix}")
}

fn error_style() -> ProgressStyle {
    template("{wide_msg:.red} {prefix:.red}")
}

fn log_style() -> ProgressStyle {
    template("{wide_msg:.dim}")
}

fn template(text: &str) -> ProgressStyle {
    ProgressStyle::with_template(text).expect("the templates in this module are valid")
}

fn elapsed_seconds(state: &ProgressState, out: &mut dyn std::fmt::Write) {
    let _ = out.write_str(&seconds(state.elapsed()));
}

fn seconds(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

/// What a log line shows on one screen row: invalid UTF-8 replaced, only the text after the
/// last carriage return (what a terminal would show of a progress meter), tabs as spaces, and
/// no other control characters, which would move the cursor under indicatif's feet.
fn printable(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches(['\r', '\n']);
    let last = text.rsplit('\r').next().unwrap_or_default();
    last.chars()
        .map(|c| if c == '\t' { ' ' } else { c })
        .filter(|c| !c.is_control())
        .take(MAX_LINE_CHARS)
        .collect()
}

#[cfg(test)]
mod tests {
    use indicatif::InMemoryTerm;
    use memobuild_protocol::LogStream;

    use super::*;

    const WIDTH: u16 = 60;

    fn ev(node: u32, kind: BuildEventKind) -> BuildEvent {
        BuildEvent { node, kind }
    }

    fn queued(node: u32, name: &str) -> BuildEvent {
        ev(node, BuildEventKind::Queued { name: name.into() })
    }

    fn log(node: u32, line: &[u8]) -> BuildEvent {
        let (stream, line) = (LogStream::Stdout, line.to_vec());
        ev(node, BuildEventKind::Log { stream, line })
    }

    /// The screen after `events` and the end of the build.
    fn screen(events: &[BuildEvent]) -> Vec<String> {
        let term = InMemoryTerm::new(30, WIDTH);
        let mut view = TtyView::new(ProgressDrawTarget::term_like(Box::new(term.clone())));
        for event in events {
            view.event(event);
        }
        view.finish();
        term.contents().lines().map(str::to_owned).collect()
    }

    #[test]
    fn final_screen_reads_like_buildkit() {
        let lines = screen(&[
            queued(1, "[stage-0 1/4] FROM busybox"),
            queued(2, "[stage-0 2/4] COPY . /app"),
            queued(3, "[stage-0 3/4] RUN make"),
            queued(4, "[stage-0 4/4] RUN make test"),
            ev(1, BuildEventKind::Cached),
            ev(2, BuildEventKind::Started),
            ev(2, BuildEventKind::Done { duration_ms: 120 }),
            ev(3, BuildEventKind::Started),
            log(3, b"cc -c main.c"),
            ev(3, BuildEventKind::Done { duration_ms: 1300 }),
            ev(4, BuildEventKind::Started),
            log(4, b"FAIL: test_parse"),
            ev(
                4,
                BuildEventKind::Failed {
                    message: "process exited with code 1".into(),
                },
            ),
        ]);
        assert!(lines[0].starts_with("[+] Building "), "{lines:#?}");
        assert!(lines[0].ends_with("(4/4) FINISHED"), "{lines:#?}");
        let steps = [
            (" => CACHED [stage-0 1/4] FROM busybox", "0.0s"),
            (" => [stage-0 2/4] COPY . /app", "0.1s"),
            (" => [stage-0 3/4] RUN make", "1.3s"),
            (" => ERROR [stage-0 4/4] RUN make test", "s"),
            (" => => # FAIL: test_parse", ""),
            (" => => # process exited with code 1", ""),
        ];
        assert_eq!(lines.len(), 1 + steps.len(), "{lines:#?}");
        for (line, (start, end)) in lines[1..].iter().zip(steps) {
            assert!(line.starts_with(start) && line.ends_with(end), "{lines:#?}");
        }
    }

    #[test]
    fn a_running_step_shows_only_its_last_lines() {
        let mut events = vec![
            queued(1, "[stage-0 1/1] RUN seq 10"),
            ev(1, BuildEventKind::Started),
        ];
        events.extend((1..=10).map(|i| log(1, format!("line {i}").as_bytes())));
        let lines = screen(&events);
        let shown: Vec<&str> = lines[2..].iter().map(String::as_str).collect();
        let expected: Vec<String> = (5..=10).map(|i| format!(" => => # line {i}")).collect();
        assert_eq!(shown, expected, "{lines:#?}");
    }

    #[test]
    fn odd_input_neither_panics_nor_breaks_the_screen() {
        let long = "x".repeat(100_000);
        let lines = screen(&[
            log(7, b"a log line for a step never started"),
            ev(8, BuildEventKind::Done { duration_ms: 5 }),
            queued(1, &format!("[stage-0 1/1] RUN echo {long}")),
            ev(1, BuildEventKind::Started),
            ev(1, BuildEventKind::Started),
            log(1, long.as_bytes()),
            log(1, "漢字".repeat(50).as_bytes()),
            log(1, b"10%\r50%\r100%"),
            // Last, because the test terminal (vt100) drops U+FFFD where a real one draws it.
            log(1, b"\xff\xfebytes\x1b[2J\x07"),
        ]);
        assert_eq!(lines.len(), 6, "{lines:#?}");
        let x_row = format!(" => => # {}", "x".repeat(usize::from(WIDTH) - 9));
        assert_eq!(lines[1].chars().count(), usize::from(WIDTH), "{lines:#?}");
        assert_eq!(lines[2], x_row);
        assert!(lines[3].starts_with(" => => # 漢字漢字"), "{lines:#?}");
        assert_eq!(lines[4], " => => # 100%");
        assert_eq!(lines[5], " => => # bytes[2J");
    }

    #[test]
    fn log_lines_are_made_printable() {
        assert_eq!(printable(b"\xffa\tb\x1b[2J\r\n"), "\u{fffd}a b[2J");
        assert_eq!(printable(b"10%\r100%"), "100%");
        assert_eq!(printable(&[b'x'; 5000]).len(), MAX_LINE_CHARS);
    }

    #[test]
    fn a_failure_for_an_unnamed_step_still_gets_a_line() {
        let lines = screen(&[ev(
            3,
            BuildEventKind::Failed {
                message: "no such step".into(),
            },
        )]);
        assert!(lines[1].starts_with(" => ERROR #3"), "{lines:#?}");
        assert_eq!(lines[2], " => => # no such step");
    }

    /// The daemon's error ends the build without `finish`: the client just drops the view.
    #[test]
    fn a_failed_build_leaves_the_whole_screen_when_dropped() {
        let term = InMemoryTerm::new(30, WIDTH);
        let mut view = TtyView::new(ProgressDrawTarget::term_like(Box::new(term.clone())));
        view.event(&queued(1, "[a 1/1] RUN false"));
        view.event(&ev(1, BuildEventKind::Started));
        view.event(&ev(
            1,
            BuildEventKind::Failed {
                message: "exit code 1".into(),
            },
        ));
        drop(view);
        let screen = term.contents();
        let lines: Vec<&str> = screen.lines().collect();
        assert!(lines[0].starts_with("[+] Building ") && lines[0].ends_with("(1/1)"));
        assert!(
            lines[1].starts_with(" => ERROR [a 1/1] RUN false"),
            "{screen}"
        );
        assert_eq!(lines[2], " => => # exit code 1");
    }
}
