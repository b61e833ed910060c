//! Human-readable output. Everything here is presentation: no decisions, no I/O.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use memobuild_protocol::{
    CacheStats, GcReport, GraphNodeView, GraphView, PrebuildStatus, RemoteCacheMode,
    RemoteCacheStatus, StatusReport, WorkspaceStatus,
};

pub fn status(report: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "memobuildd {} (protocol {}), pid {}, uid {}, up {}",
        report.daemon_version,
        report.protocol_version,
        report.pid,
        report.uid,
        duration(Duration::from_millis(report.uptime_ms))
    );
    let activated = if report.socket_activated {
        " (socket-activated)"
    } else {
        ""
    };
    let _ = writeln!(out, "socket:       {}{activated}", report.socket.display());
    let _ = writeln!(out, "root:         {}", report.root.display());
    let _ = writeln!(
        out,
        "connections:  {} open, {} served; {} requests",
        report.connections_active, report.connections_total, report.requests_total
    );
    let _ = writeln!(out, "builds:       {} running", report.builds.len());
    for build in &report.builds {
        let step = build.step.as_deref().unwrap_or("waiting");
        let _ = writeln!(
            out,
            "  {} ({}): {step}, {}/{} steps, {}",
            build.context.display(),
            build.dockerfile.display(),
            build.steps_done,
            build.steps_total,
            duration(Duration::from_millis(build.elapsed_ms))
        );
    }
    let _ = writeln!(out, "cache:        {}", cache(&report.cache));
    let _ = writeln!(
        out,
        "remote:       {}",
        report.remote.as_deref().map_or("none".to_owned(), remote)
    );
    if report.workspaces.is_empty() {
        let _ = writeln!(out, "workspaces:   none watched");
    } else {
        let _ = writeln!(out, "workspaces:");
        for workspace in &report.workspaces {
            out.push_str(&self::workspace(workspace));
        }
    }
    out
}

/// The L3 line: where, how it is doing, what it served and what waits to go up.
fn remote(status: &RemoteCacheStatus) -> String {
    let mode = match status.mode {
        RemoteCacheMode::ReadWrite => "read-write",
        RemoteCacheMode::ReadOnly => "read-only",
        RemoteCacheMode::Off => "off",
    };
    let health = if status.healthy {
        "healthy".to_owned()
    } else {
        format!(
            "UNAVAILABLE ({}), builds are local-only",
            status.last_error.as_deref().unwrap_or("failing")
        )
    };
    let mut line = format!(
        "{} ({mode}), {health}; {} hits, {} misses; {} down, {} up; upload queue {} ({}), {} uploaded, {} failed, {} dropped",
        status.endpoint,
        status.hits,
        status.misses,
        bytes(status.bytes_down),
        bytes(status.bytes_up),
        status.upload_queue,
        bytes(status.upload_queue_bytes),
        status.uploads_done,
        status.uploads_failed,
        status.uploads_dropped
    );
    if status.bad_signatures + status.corrupt_blobs > 0 {
        let _ = write!(
            line,
            "; ignored: {} badly signed entries, {} corrupt blobs",
            status.bad_signatures, status.corrupt_blobs
        );
    }
    line
}

fn cache(stats: &CacheStats) -> String {
    format!(
        "L1 {} entries ({}); L2 {} of {} budget: {} blobs ({}), {} actions, {} unpacked layers ({}); {} hits, {} misses",
        stats.l1_entries,
        bytes(stats.l1_bytes),
        bytes(stats.total_bytes),
        bytes(stats.l2_budget_bytes),
        stats.l2_blobs,
        bytes(stats.l2_bytes),
        stats.action_entries,
        stats.unpacked_layers,
        bytes(stats.unpacked_bytes),
        stats.hits,
        stats.misses
    )
}

/// `memobuild cache stats`: per kind, the budget, the hit rate, the last GC.
pub fn cache_stats(stats: &CacheStats) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:<16} {:>10} {:>12}", "KIND", "COUNT", "SIZE");
    let mut row = |kind: &str, count: Option<u64>, size: Option<u64>| {
        let count = count.map_or_else(String::new, |c| c.to_string());
        let size = size.map_or_else(String::new, bytes);
        let _ = writeln!(out, "{kind:<16} {count:>10} {size:>12}");
    };
    row("blobs", Some(stats.l2_blobs), Some(stats.l2_bytes));
    row(
        "unpacked layers",
        Some(stats.unpacked_layers),
        Some(stats.unpacked_bytes),
    );
    row(
        "cache mounts",
        Some(stats.cache_mounts),
        Some(stats.cache_mount_bytes),
    );
    row("actions", Some(stats.action_entries), None);
    row("tags", Some(stats.tags), None);
    row("index", None, Some(stats.index_bytes));
    row("directories", None, Some(stats.other_bytes));
    row("total", None, Some(stats.total_bytes));
    let _ = writeln!(
        out,
        "budget:      {}{}",
        bytes(stats.l2_budget_bytes),
        stats
            .keep_duration_secs
            .map(|s| format!(
                ", and nothing unused for more than {}",
                duration(Duration::from_secs(s))
            ))
            .unwrap_or_default()
    );
    let lookups = stats.hits + stats.misses;
    let rate = if lookups == 0 {
        "no lookups yet".to_owned()
    } else {
        format!(
            "{:.1}% ({} of {lookups} lookups)",
            stats.hits as f64 * 100.0 / lookups as f64,
            stats.hits
        )
    };
    let _ = writeln!(out, "hit rate:    {rate}");
    let _ = writeln!(
        out,
        "in use:      {} lease(s){}",
        stats.leases,
        if stats.gc_running { "; GC running" } else { "" }
    );
    match &stats.last_gc {
        Some(last) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let _ = writeln!(
                out,
                "last GC:     {} ago ({}): {}",
                duration(Duration::from_secs(now.saturating_sub(last.finished_unix))),
                last.trigger,
                gc_report(&last.report).trim_end()
            );
        }
        None => {
            let _ = writeln!(out, "last GC:     none since the daemon started");
        }
    }
    out
}

/// What a GC pass freed (or, dry, would free).
pub fn gc_report(report: &GcReport) -> String {
    format!(
        "{} {} ({} cached steps, {} base images, {} blobs, {} unpacked layers, {} cache mounts); {} kept{}, in {}\n",
        if report.dry_run {
            "would free"
        } else {
            "freed"
        },
        bytes(report.freed_bytes),
        report.removed_actions,
        report.removed_bases,
        report.removed_blobs,
        report.removed_layers,
        report.removed_cache_mounts,
        bytes(report.kept_bytes),
        if report.complete {
            ""
        } else {
            " (stopped at its time limit; the next pass goes on)"
        },
        duration(Duration::from_millis(report.duration_ms))
    )
}

/// One workspace: where, how big, how fresh, and what is dirty because of what.
pub fn workspace(ws: &WorkspaceStatus) -> String {
    let live = match (&ws.degraded, ws.watching) {
        (Some(why), _) => format!(", degraded, scanned at build time: {why}"),
        (None, true) => String::new(),
        (None, false) => ", not watched live (scanned at build time)".into(),
    };
    let mut out = format!(
        "  {} ({}): {} files, {}{live}\n",
        ws.context.display(),
        ws.dockerfile.display(),
        ws.files,
        bytes(ws.bytes),
    );
    if let Some(ms) = ws.last_change_unix_ms {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let ago = Duration::from_millis(now.saturating_sub(ms));
        let _ = writeln!(out, "    last change {} ago", duration(ago));
    }
    if let Some(error) = &ws.error {
        let _ = writeln!(
            out,
            "    Dockerfile error: {}",
            error.replace('\n', "\n      ")
        );
    }
    if !ws.built {
        let _ = writeln!(out, "    never built: nothing to compare with yet");
    } else if ws.dirty.is_empty() {
        let _ = writeln!(out, "    clean: nothing changed since the last build");
    }
    for dirty in &ws.dirty {
        let _ = writeln!(out, "    dirty: {}  (changed: {})", dirty.node, dirty.cause);
    }
    out.push_str(&prebuild(&ws.prebuild));
    out
}

/// A workspace's prebuild: off, idle, waiting, running step i/n, ready, failed with its log.
pub fn prebuild(status: &PrebuildStatus) -> String {
    let ago = |unix_ms: u64| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        duration(Duration::from_millis(now.saturating_sub(unix_ms)))
    };
    match status {
        PrebuildStatus::Off => "    prebuild: off\n".to_owned(),
        PrebuildStatus::Idle => "    prebuild: idle\n".to_owned(),
        PrebuildStatus::Waiting => "    prebuild: waiting\n".to_owned(),
        PrebuildStatus::Running {
            step,
            steps_done,
            steps_total,
        } => format!(
            "    prebuild: running step {}/{steps_total}{}\n",
            (steps_done + 1).min(*steps_total),
            step.as_deref().map(|s| format!(" {s}")).unwrap_or_default()
        ),
        PrebuildStatus::Ready {
            digest,
            finished_unix_ms,
        } => format!(
            "    prebuild: ready {digest} ({} ago)\n",
            ago(*finished_unix_ms)
        ),
        PrebuildStatus::Failed {
            step,
            exit_code,
            message,
            log_tail,
            finished_unix_ms,
        } => {
            let mut out = match (step, exit_code) {
                (Some(step), Some(code)) => {
                    format!("    prebuild: failed at {step}: exit code {code}")
                }
                (Some(step), None) => format!("    prebuild: failed at {step}"),
                _ => format!(
                    "    prebuild: failed: {}",
                    message.lines().next().unwrap_or(message)
                ),
            };
            let _ = writeln!(out, " ({} ago)", ago(*finished_unix_ms));
            for line in log_tail {
                let _ = writeln!(out, "      | {line}");
            }
            out
        }
    }
}

/// One line per blob event of a push, as `docker push` shows them.
pub fn push_progress(progress: &memobuild_protocol::PushProgress) -> String {
    use memobuild_protocol::PushState;
    let short = progress
        .digest
        .trim_start_matches("sha256:")
        .get(..12)
        .unwrap_or("");
    match &progress.state {
        PushState::Skipped => format!("{short}: layer already exists"),
        PushState::Mounted(from) => format!("{short}: mounted from {from}"),
        PushState::Uploading => format!(
            "{short}: pushing {} / {}",
            bytes(progress.sent),
            bytes(progress.total)
        ),
        PushState::Done => format!("{short}: pushed {}", bytes(progress.total)),
    }
}

/// `1.5 KiB`, `3.2 GiB`: binary units, one decimal.
pub use memobuild_protocol::units::format_bytes as bytes;

/// `850ms`, `12.3s`, `4m05s`, `2h10m`.
pub fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{:.1}s", d.as_secs_f64()),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// The build graph as text: each stage with its nodes, each node with what it needs.
pub fn graph_text(view: &GraphView) -> String {
    let mut needs: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (from, to) in &view.edges {
        needs.entry(*to).or_default().push(*from);
    }
    let node_line = |out: &mut String, node: &GraphNodeView| {
        let line = node.line.map(|l| format!("line {l}")).unwrap_or_default();
        let deps = needs
            .get(&node.id)
            .map(|deps| {
                let list: Vec<String> = deps.iter().map(|d| format!("#{d}")).collect();
                format!("needs {}", list.join(" "))
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  #{:<3} {:<14} {:<40} {:<9} {deps}",
            node.id, node.kind, node.label, line
        );
    };
    let mut out = String::new();
    for stage in &view.stages {
        let name = stage
            .name
            .as_deref()
            .map(|n| format!(" {n:?}"))
            .unwrap_or_default();
        let _ = writeln!(out, "stage {}{name} (from {})", stage.index, stage.base);
        for node in view.nodes.iter().filter(|n| n.stage == Some(stage.index)) {
            node_line(&mut out, node);
        }
    }
    let outside: Vec<&GraphNodeView> = view.nodes.iter().filter(|n| n.stage.is_none()).collect();
    if !outside.is_empty() {
        let _ = writeln!(out, "outside stages");
        for node in outside {
            node_line(&mut out, node);
        }
    }
    out
}

/// The build graph in Graphviz DOT, one cluster per stage.
pub fn graph_dot(view: &GraphView) -> String {
    let mut out = String::from(
        "digraph memobuild {\n  rankdir=LR;\n  node [shape=box, fontname=monospace];\n",
    );
    let node_decl = |node: &GraphNodeView| {
        format!(
            "n{} [label={}];",
            node.id,
            dot_quote(&format!("#{} {}\n{}", node.id, node.kind, node.label))
        )
    };
    for stage in &view.stages {
        let title = stage
            .name
            .clone()
            .unwrap_or_else(|| format!("stage {}", stage.index));
        let _ = writeln!(
            out,
            "  subgraph cluster_{} {{\n    label={};",
            stage.index,
            dot_quote(&title)
        );
        for node in view.nodes.iter().filter(|n| n.stage == Some(stage.index)) {
            let _ = writeln!(out, "    {}", node_decl(node));
        }
        out.push_str("  }\n");
    }
    for node in view.nodes.iter().filter(|n| n.stage.is_none()) {
        let _ = writeln!(out, "  {}", node_decl(node));
    }
    for (from, to) in &view.edges {
        let _ = writeln!(out, "  n{from} -> n{to};");
    }
    out.push_str("}\n");
    out
}

fn dot_quote(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_naturally() {
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(duration(Duration::from_secs(7800)), "2h10m");
    }

    #[test]
    fn the_remote_line_says_health_traffic_and_queue() {
        let mut status = RemoteCacheStatus {
            endpoint: "grpc://cache:8980/team".into(),
            mode: RemoteCacheMode::ReadWrite,
            healthy: true,
            last_error: None,
            hits: 7,
            misses: 2,
            bad_signatures: 0,
            corrupt_blobs: 0,
            errors: 0,
            bytes_down: 3 << 20,
            bytes_up: 0,
            upload_queue: 1,
            upload_queue_bytes: 2048,
            uploads_done: 4,
            uploads_failed: 0,
            uploads_dropped: 0,
        };
        let line = remote(&status);
        assert!(line.starts_with("grpc://cache:8980/team (read-write), healthy; 7 hits, 2 misses"));
        assert!(line.contains("upload queue 1"), "{line}");
        assert!(!line.contains("ignored"), "{line}");
        status.healthy = false;
        status.last_error = Some("connection refused".into());
        status.bad_signatures = 3;
        let line = remote(&status);
        assert!(line.contains("UNAVAILABLE (connection refused)"), "{line}");
        assert!(line.contains("3 badly signed entries"), "{line}");
    }
}
