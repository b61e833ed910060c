//! Build progress on the client: BuildKit's TTY view on a terminal ([`tty`]), its plain format
//! elsewhere (so CI log readers keep working), JSON lines, or nothing. The daemon sends events;
//! only this module draws.
//!
//! Plain, as BuildKit prints it:
//! ```text
//! #3 [build 2/5] RUN make
//! #3 0.214 compiling…
//! #3 DONE 1.3s
//! #4 [build 3/5] COPY src/ /app/
//! #4 CACHED
//! ```

use std::collections::HashMap;
use std::io::Write;
use std::time::Instant;

use indicatif::ProgressDrawTarget;
use memobuild_protocol::{BuildEvent, BuildEventKind, BuildResult, LogStream};
use serde_json::json;

mod tty;

use tty::TtyView;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// The TTY view on a terminal, plain on a pipe or a file
    Auto,
    Tty,
    Plain,
    Json,
    Quiet,
}

/// Turns events into lines on `out` (normally stderr, as BuildKit writes progress).
#[derive(Debug)]
pub struct Progress<W: Write> {
    mode: ProgressMode,
    out: W,
    names: HashMap<u32, String>,
    started: HashMap<u32, Instant>,
    /// Per step, in the order they were decided: `None` cached, `Some(why)` it ran.
    outcomes: Vec<(u32, Option<String>)>,
    /// The screen under `--progress tty`, until the build ends.
    tty: Option<TtyView>,
}

impl ProgressMode {
    /// `Auto` made concrete: what BuildKit picks for where progress goes.
    pub fn resolve(self, is_terminal: bool) -> Self {
        match self {
            Self::Auto if is_terminal => Self::Tty,
            Self::Auto => Self::Plain,
            mode => mode,
        }
    }
}

impl<W: Write> Progress<W> {
    /// Under `Tty` the screen is drawn on stderr (indicatif draws nothing if stderr is not a
    /// terminal); `out` then only gets the closing summary.
    pub fn new(mode: ProgressMode, out: W) -> Self {
        let tty = (mode == ProgressMode::Tty)
            .then(|| TtyView::new(ProgressDrawTarget::stderr_with_hz(tty::REDRAW_HZ)));
        Self::with_view(mode, out, tty)
    }

    fn with_view(mode: ProgressMode, out: W, tty: Option<TtyView>) -> Self {
        Self {
            mode,
            out,
            names: HashMap::new(),
            started: HashMap::new(),
            outcomes: Vec::new(),
            tty,
        }
    }

    pub fn event(&mut self, event: &BuildEvent) {
        match &event.kind {
            BuildEventKind::Queued { name } => {
                self.names.insert(event.node, name.clone());
            }
            BuildEventKind::Cached => self.outcomes.push((event.node, None)),
            BuildEventKind::Reason { reason } => {
                self.outcomes.push((event.node, Some(reason.clone())));
            }
            _ => {}
        }
        match self.mode {
            ProgressMode::Quiet => {}
            ProgressMode::Json => {
                let _ = writeln!(self.out, "{}", json_event(event));
            }
            ProgressMode::Tty => {
                if let Some(view) = &mut self.tty {
                    view.event(event);
                }
            }
            ProgressMode::Auto | ProgressMode::Plain => self.plain(event),
        }
    }

    fn plain(&mut self, event: &BuildEvent) {
        let n = event.node;
        let line = match &event.kind {
            BuildEventKind::Queued { .. } => return,
            BuildEventKind::Reason { reason } => format!("#{n} REBUILD {reason}"),
            BuildEventKind::Cached => format!("#{n} {}\n#{n} CACHED", self.name(n)),
            BuildEventKind::Started => {
                self.started.insert(n, Instant::now());
                format!("#{n} {}", self.name(n))
            }
            BuildEventKind::Log { line, .. } => {
                let elapsed = self
                    .started
                    .get(&n)
                    .map_or(0.0, |t| t.elapsed().as_secs_f64());
                format!("#{n} {elapsed:.3} {}", String::from_utf8_lossy(line))
            }
            BuildEventKind::Done { duration_ms } => {
                format!("#{n} DONE {:.1}s", *duration_ms as f64 / 1000.0)
            }
            BuildEventKind::Failed { message } => {
                format!("#{n} ERROR: {}", message.lines().next().unwrap_or(message))
            }
            BuildEventKind::Warning { message } => format!("WARNING: {message}"),
            BuildEventKind::Prebuilt { ago_ms, joined } => {
                format!("#{n} {}", prebuilt(*ago_ms, *joined))
            }
        };
        let _ = writeln!(self.out, "{line}");
    }

    fn name(&self, n: u32) -> &str {
        self.names.get(&n).map_or("", String::as_str)
    }

    /// `--explain`: every step, cached or why it ran, in the order they were decided.
    pub fn explanation(&self) -> String {
        let mut out = String::from("why each step ran (compared with the previous build):\n");
        for (node, outcome) in &self.outcomes {
            let verdict = outcome
                .as_deref()
                .map_or("CACHED".to_owned(), |why| format!("REBUILD {why}"));
            out.push_str(&format!(
                "  #{node:<3} {:<48} {verdict}\n",
                self.name(*node)
            ));
        }
        out
    }

    pub fn finished(&mut self, result: &BuildResult) {
        if let Some(view) = self.tty.take() {
            view.finish();
        }
        let digest = result.image_digest.as_deref().unwrap_or("(none)");
        match self.mode {
            ProgressMode::Quiet => {}
            ProgressMode::Json => {
                let _ = writeln!(self.out, "{}", json!({ "result": result }));
            }
            _ => {
                let _ = writeln!(
                    self.out,
                    "built {digest} in {:.2}s: {} steps, {} cached, {} executed",
                    result.duration_ms as f64 / 1000.0,
                    result.steps,
                    result.cached,
                    result.executed
                );
            }
        }
    }
}

fn json_event(event: &BuildEvent) -> serde_json::Value {
    let node = event.node;
    match &event.kind {
        BuildEventKind::Queued { name } => json!({"node": node, "event": "queued", "name": name}),
        BuildEventKind::Cached => json!({"node": node, "event": "cached"}),
        BuildEventKind::Started => json!({"node": node, "event": "started"}),
        BuildEventKind::Log { stream, line } => json!({
            "node": node,
            "event": "log",
            "stream": match stream { LogStream::Stdout => "stdout", LogStream::Stderr => "stderr" },
            "line": String::from_utf8_lossy(line),
        }),
        BuildEventKind::Done { duration_ms } => {
            json!({"node": node, "event": "done", "duration_ms": duration_ms})
        }
        BuildEventKind::Failed { message } => {
            json!({"node": node, "event": "failed", "message": message})
        }
        BuildEventKind::Reason { reason } => {
            json!({"node": node, "event": "reason", "reason": reason})
        }
        BuildEventKind::Warning { message } => {
            json!({"node": node, "event": "warning", "message": message})
        }
        BuildEventKind::Prebuilt { ago_ms, joined } => {
            json!({"node": node, "event": "prebuilt", "ago_ms": ago_ms, "joined": joined})
        }
    }
}

/// How a step a prebuild made reads: when it was made, or that this build waited for it.
pub(crate) fn prebuilt(ago_ms: u64, joined: bool) -> String {
    if joined {
        "PREBUILT (joined the running prebuild)".to_owned()
    } else {
        let ago = std::time::Duration::from_millis(ago_ms);
        format!("PREBUILT {} ago", crate::render::duration(ago))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(events: &[BuildEvent]) -> String {
        let mut progress = Progress::new(ProgressMode::Plain, Vec::new());
        for event in events {
            progress.event(event);
        }
        String::from_utf8(progress.out).expect("utf-8")
    }

    fn ev(node: u32, kind: BuildEventKind) -> BuildEvent {
        BuildEvent { node, kind }
    }

    #[test]
    fn plain_output_reads_like_buildkit() {
        let out = render(&[
            ev(
                1,
                BuildEventKind::Queued {
                    name: "[stage-0 1/2] FROM busybox".into(),
                },
            ),
            ev(
                2,
                BuildEventKind::Queued {
                    name: "[stage-0 2/2] RUN echo hi".into(),
                },
            ),
            ev(1, BuildEventKind::Cached),
            ev(2, BuildEventKind::Started),
            ev(
                2,
                BuildEventKind::Log {
                    stream: LogStream::Stdout,
                    line: b"hi".to_vec(),
                },
            ),
            ev(2, BuildEventKind::Done { duration_ms: 300 }),
        ]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "#1 [stage-0 1/2] FROM busybox");
        assert_eq!(lines[1], "#1 CACHED");
        assert_eq!(lines[2], "#2 [stage-0 2/2] RUN echo hi");
        assert!(
            lines[3].starts_with("#2 0.") && lines[3].ends_with(" hi"),
            "{}",
            lines[3]
        );
        assert_eq!(lines[4], "#2 DONE 0.3s");
    }

    #[test]
    fn tty_mode_draws_the_screen_then_prints_the_summary() {
        let term = indicatif::InMemoryTerm::new(10, 60);
        let target = ProgressDrawTarget::term_like(Box::new(term.clone()));
        let view = TtyView::new(target);
        let mut progress = Progress::with_view(ProgressMode::Tty, Vec::new(), Some(view));
        progress.event(&ev(
            1,
            BuildEventKind::Queued {
                name: "[a 1/1] RUN x".into(),
            },
        ));
        progress.event(&ev(1, BuildEventKind::Started));
        progress.event(&ev(1, BuildEventKind::Done { duration_ms: 2000 }));
        progress.finished(&BuildResult {
            image_digest: None,
            duration_ms: 2100,
            steps: 1,
            cached: 0,
            executed: 1,
            config_digest: None,
        });
        let screen = term.contents();
        assert!(screen.contains("(1/1) FINISHED"), "{screen}");
        assert!(screen.contains(" => [a 1/1] RUN x"), "{screen}");
        let out = String::from_utf8(progress.out).expect("utf-8");
        assert_eq!(
            out,
            "built (none) in 2.10s: 1 steps, 0 cached, 1 executed\n"
        );
    }

    #[test]
    fn auto_is_the_tty_view_only_on_a_terminal() {
        assert_eq!(ProgressMode::Auto.resolve(true), ProgressMode::Tty);
        assert_eq!(ProgressMode::Auto.resolve(false), ProgressMode::Plain);
        assert_eq!(ProgressMode::Json.resolve(true), ProgressMode::Json);
        assert_eq!(ProgressMode::Tty.resolve(false), ProgressMode::Tty);
    }
}
