//! A build's events on their way to its client, in bounded memory.
//!
//! The engine reports as fast as its steps log; the client reads as fast as it reads. What
//! waits between them is bounded per build: step events (queued, started, done…) are few
//! and always kept, log lines beyond [`LOG_BYTES`] waiting are dropped, and the client is
//! told how many, at the place they went missing. A client that reads nothing cannot make
//! the daemon hold more than that (and is disconnected after a while, `build::stream_build`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use crate::engine::{Progress, Reporter};
use crate::exec::LogStream;

/// Log bytes a build may have waiting for its client (each line counted with the size of its
/// event, so many short lines cannot hold more than this either).
pub(crate) const LOG_BYTES: usize = 4 << 20;

#[derive(Debug, Default)]
struct Queued {
    events: VecDeque<Progress>,
    log_bytes: usize,
    /// Log lines dropped since the last one queued, by step.
    dropped: Vec<(u32, u64)>,
    /// The engine let go of the reporter: the build is over once the queue is empty.
    closed: bool,
}

/// The queue between one build's engine and its connection.
#[derive(Debug, Default)]
pub(crate) struct Events {
    queued: Mutex<Queued>,
    ready: Notify,
    limit: usize,
}

/// The engine's end: dropping the last clone ends the stream.
pub(crate) struct Sender(Arc<Events>);

impl Events {
    pub(crate) fn new(limit: usize) -> (Sender, Arc<Self>) {
        let events = Arc::new(Self {
            limit,
            ..Self::default()
        });
        (Sender(Arc::clone(&events)), events)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queued> {
        self.queued.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next event, `None` once the build is over and everything was taken.
    pub(crate) async fn next(&self) -> Option<Progress> {
        loop {
            // Registered before looking, so a push between the look and the wait is seen.
            let notified = self.ready.notified();
            {
                let mut queued = self.lock();
                if let Some(event) = queued.events.pop_front() {
                    if let Progress::Log { line, .. } = &event {
                        queued.log_bytes -= cost(line);
                    }
                    return Some(event);
                }
                if let Some((node, lines)) = queued.dropped.pop() {
                    return Some(dropped_marker(node, lines));
                }
                if queued.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Bytes of log lines waiting now.
    #[cfg(test)]
    fn log_bytes(&self) -> usize {
        self.lock().log_bytes
    }
}

/// What a queued log line holds in memory.
fn cost(line: &[u8]) -> usize {
    line.len() + std::mem::size_of::<Progress>()
}

/// What the client sees where lines went missing.
fn dropped_marker(node: u32, lines: u64) -> Progress {
    Progress::Log {
        node,
        stream: LogStream::Stderr,
        line: format!(
            "[memobuild: {lines} log lines dropped: the client did not keep up with this step's output]"
        )
        .into_bytes(),
    }
}

impl Reporter for Sender {
    fn report(&self, event: Progress) {
        let events = &self.0;
        {
            let mut queued = events.lock();
            if let Progress::Log { node, line, .. } = &event {
                if queued.log_bytes + cost(line) > events.limit {
                    match queued.dropped.iter_mut().find(|(n, _)| n == node) {
                        Some((_, lines)) => *lines += 1,
                        None => queued.dropped.push((*node, 1)),
                    }
                    return;
                }
                // Room again: the marker goes where the lines went missing.
                if let Some(at) = queued.dropped.iter().position(|(n, _)| n == node) {
                    let (node, lines) = queued.dropped.remove(at);
                    queued.events.push_back(dropped_marker(node, lines));
                }
                queued.log_bytes += cost(line);
            }
            queued.events.push_back(event);
        }
        events.ready.notify_one();
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(node: u32, text: &str) -> Progress {
        Progress::Log {
            node,
            stream: LogStream::Stdout,
            line: text.as_bytes().to_vec(),
        }
    }

    fn text(event: &Progress) -> String {
        match event {
            Progress::Log { line, .. } => String::from_utf8_lossy(line).into_owned(),
            other => format!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn lines_over_the_limit_are_dropped_and_counted_step_events_never() {
        let (sender, events) = Events::new(2 * cost(b"12345"));
        sender.report(Progress::Started { node: 1 });
        for _ in 0..1000 {
            sender.report(log(1, "12345"));
        }
        sender.report(Progress::Done {
            node: 1,
            duration: std::time::Duration::ZERO,
        });
        assert_eq!(events.log_bytes(), 2 * cost(b"12345"));
        let first: Vec<String> = [
            events.next().await,
            events.next().await,
            events.next().await,
        ]
        .iter()
        .map(|e| text(e.as_ref().expect("an event")))
        .collect();
        assert_eq!(first[1..], ["12345", "12345"]);
        // Room again: a later line comes after the count of those that went missing.
        sender.report(log(1, "later"));
        let rest: Vec<String> = events.lock().events.drain(..).map(|e| text(&e)).collect();
        assert!(rest[0].contains("Done"), "{rest:?}");
        assert!(rest[1].contains("998 log lines dropped"), "{rest:?}");
        assert_eq!(rest[2], "later");
        drop(sender);
        assert!(events.next().await.is_none());
    }

    #[tokio::test]
    async fn drops_at_the_end_are_reported_before_the_stream_ends() {
        let (sender, events) = Events::new(cost(b"abcd"));
        sender.report(log(2, "abcd"));
        sender.report(log(2, "efgh"));
        drop(sender);
        assert_eq!(text(&events.next().await.expect("line")), "abcd");
        let marker = text(&events.next().await.expect("marker"));
        assert!(marker.contains("1 log lines dropped"), "{marker}");
        assert!(events.next().await.is_none());
    }
}
