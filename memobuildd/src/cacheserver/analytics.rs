//! Per-client build analytics: what daemons report after each build (`POST /v1/builds`),
//! kept in `DIR/analytics.sqlite`, summed per client by `GET /v1/clients`. The main types are
//! [`BuildReport`] (the JSON a daemon sends) and [`Analytics`] (the table). Webhooks
//! (`webhook`) forward each report.
//!
//! The report (every count optional, default 0; unknown fields ignored so daemons may send
//! more; at most 64 KiB):
//!
//! ```json
//! { "client": "alice-laptop", "build_id": "b-42", "started_unix_ms": 1765141200000,
//!   "duration_ms": 5230, "steps": 14, "cached_steps": 12, "executed_steps": 2,
//!   "remote_hits": 9, "remote_misses": 3, "bytes_downloaded": 1048576,
//!   "bytes_uploaded": 4096, "success": true, "image": "sha256:…", "target": "app" }
//! ```
//!
//! With authentication on, the client is the token's name and `client` is ignored; without,
//! it is `client`, else the peer's address.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

/// Longest accepted text field.
const MAX_TEXT: usize = 256;

/// What a daemon reports after a build.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BuildReport {
    pub client: Option<String>,
    pub build_id: Option<String>,
    pub started_unix_ms: Option<i64>,
    pub duration_ms: u64,
    pub steps: u64,
    pub cached_steps: u64,
    pub executed_steps: u64,
    pub remote_hits: u64,
    pub remote_misses: u64,
    pub bytes_downloaded: u64,
    pub bytes_uploaded: u64,
    pub success: bool,
    pub image: Option<String>,
    pub target: Option<String>,
}

/// Why a report was refused (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("not a build report: {0}")]
    Json(#[from] serde_json::Error),
    #[error("field {field} is longer than {MAX_TEXT} bytes")]
    TooLong { field: &'static str },
    #[error("cached_steps + executed_steps ({sum}) exceeds steps ({steps})")]
    Counts { sum: u64, steps: u64 },
}

impl BuildReport {
    pub fn parse(body: &[u8]) -> Result<Self, ReportError> {
        let report: Self = serde_json::from_slice(body)?;
        for (field, value) in [
            ("client", &report.client),
            ("build_id", &report.build_id),
            ("image", &report.image),
            ("target", &report.target),
        ] {
            if value.as_ref().is_some_and(|v| v.len() > MAX_TEXT) {
                return Err(ReportError::TooLong { field });
            }
        }
        let sum = report.cached_steps.saturating_add(report.executed_steps);
        if sum > report.steps {
            return Err(ReportError::Counts {
                sum,
                steps: report.steps,
            });
        }
        Ok(report)
    }
}

/// One client's totals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientSummary {
    pub client: String,
    pub builds: u64,
    pub failed_builds: u64,
    pub steps: u64,
    pub cached_steps: u64,
    /// cached_steps / steps (0 without steps).
    pub hit_rate: f64,
    pub remote_hits: u64,
    pub remote_misses: u64,
    pub bytes_downloaded: u64,
    pub bytes_uploaded: u64,
    pub total_duration_ms: u64,
    pub last_build_unix_ms: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("analytics {}: {source}", path.display())]
pub struct AnalyticsError {
    path: PathBuf,
    #[source]
    source: rusqlite::Error,
}

/// The builds table; every call blocks (run it on a blocking thread).
#[derive(Debug)]
pub struct Analytics {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl Analytics {
    pub fn open(path: &Path) -> Result<Self, AnalyticsError> {
        let err = |source| AnalyticsError {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS builds (
                 id INTEGER PRIMARY KEY,
                 client TEXT NOT NULL,
                 build_id TEXT,
                 received_unix_ms INTEGER NOT NULL,
                 started_unix_ms INTEGER,
                 duration_ms INTEGER NOT NULL,
                 steps INTEGER NOT NULL,
                 cached_steps INTEGER NOT NULL,
                 executed_steps INTEGER NOT NULL,
                 remote_hits INTEGER NOT NULL,
                 remote_misses INTEGER NOT NULL,
                 bytes_downloaded INTEGER NOT NULL,
                 bytes_uploaded INTEGER NOT NULL,
                 success INTEGER NOT NULL,
                 image TEXT,
                 target TEXT
             );
             CREATE INDEX IF NOT EXISTS builds_by_client ON builds (client);",
        )
        .map_err(err)?;
        Ok(Self {
            path: path.to_owned(),
            conn: Mutex::new(conn),
        })
    }

    fn err(&self) -> impl FnOnce(rusqlite::Error) -> AnalyticsError + '_ {
        |source| AnalyticsError {
            path: self.path.clone(),
            source,
        }
    }

    /// Stores a report from `client`; returns its id.
    pub fn record(
        &self,
        client: &str,
        received_unix_ms: i64,
        report: &BuildReport,
    ) -> Result<i64, AnalyticsError> {
        let conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        conn.execute(
            "INSERT INTO builds (client, build_id, received_unix_ms, started_unix_ms, duration_ms,
                 steps, cached_steps, executed_steps, remote_hits, remote_misses,
                 bytes_downloaded, bytes_uploaded, success, image, target)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                client,
                report.build_id,
                received_unix_ms,
                report.started_unix_ms,
                n(report.duration_ms),
                n(report.steps),
                n(report.cached_steps),
                n(report.executed_steps),
                n(report.remote_hits),
                n(report.remote_misses),
                n(report.bytes_downloaded),
                n(report.bytes_uploaded),
                report.success,
                report.image,
                report.target,
            ],
        )
        .map_err(self.err())?;
        Ok(conn.last_insert_rowid())
    }

    /// Every client's totals, most recently active first.
    pub fn clients(&self) -> Result<Vec<ClientSummary>, AnalyticsError> {
        let conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut stmt = conn
            .prepare(
                "SELECT client, COUNT(*), SUM(success = 0), SUM(steps), SUM(cached_steps),
                        SUM(remote_hits), SUM(remote_misses), SUM(bytes_downloaded),
                        SUM(bytes_uploaded), SUM(duration_ms), MAX(received_unix_ms)
                 FROM builds GROUP BY client ORDER BY MAX(received_unix_ms) DESC",
            )
            .map_err(self.err())?;
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        let rows = stmt
            .query_map([], |row| {
                let steps = u(row.get(3)?);
                let cached_steps = u(row.get(4)?);
                Ok(ClientSummary {
                    client: row.get(0)?,
                    builds: u(row.get(1)?),
                    failed_builds: u(row.get(2)?),
                    steps,
                    cached_steps,
                    #[expect(clippy::cast_precision_loss, reason = "a ratio for display")]
                    hit_rate: if steps == 0 {
                        0.0
                    } else {
                        cached_steps as f64 / steps as f64
                    },
                    remote_hits: u(row.get(5)?),
                    remote_misses: u(row.get(6)?),
                    bytes_downloaded: u(row.get(7)?),
                    bytes_uploaded: u(row.get(8)?),
                    total_duration_ms: u(row.get(9)?),
                    last_build_unix_ms: row.get(10)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_sum_per_client() {
        let dir = tempfile::tempdir().expect("tempdir");
        let analytics = Analytics::open(&dir.path().join("a.sqlite")).expect("open");
        let report = BuildReport::parse(
            br#"{"steps": 10, "cached_steps": 8, "executed_steps": 2, "duration_ms": 100,
                 "success": true, "remote_hits": 5, "future_field": [1]}"#,
        )
        .expect("parse");
        analytics.record("ci", 1, &report).expect("record");
        analytics
            .record(
                "ci",
                2,
                &BuildReport {
                    steps: 10,
                    ..BuildReport::default()
                },
            )
            .expect("record");
        analytics.record("laptop", 3, &report).expect("record");
        let clients = analytics.clients().expect("clients");
        assert_eq!(clients.len(), 2);
        assert_eq!(clients[0].client, "laptop");
        let ci = &clients[1];
        assert_eq!(
            (ci.builds, ci.failed_builds, ci.steps, ci.cached_steps),
            (2, 1, 20, 8)
        );
        assert!((ci.hit_rate - 0.4).abs() < 1e-9);
        assert_eq!(ci.total_duration_ms, 100);
    }

    #[test]
    fn bad_reports_are_refused() {
        assert!(BuildReport::parse(b"not json").is_err());
        assert!(BuildReport::parse(br#"{"steps": 1, "cached_steps": 2}"#).is_err());
        let long = format!(r#"{{"client": "{}"}}"#, "x".repeat(MAX_TEXT + 1));
        assert!(matches!(
            BuildReport::parse(long.as_bytes()),
            Err(ReportError::TooLong { field: "client" })
        ));
    }
}
