//! The image as it stands after each step of a stage: its config and its layers. Metadata
//! instructions change only the config (never a layer), with Docker's rules.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::frontend::{Command, Healthcheck as HealthcheckSpec, InstructionKind};
use crate::image::layer::Layer;
use crate::image::oci::{Healthcheck, History, ImageConfig, Platform};

pub use crate::plan::DEFAULT_PATH;
const HISTORY_COMMENT: &str = "memobuild.dockerfile.v0";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub config: ImageConfig,
    /// Bottom first; `config.diff_ids` always mirrors it.
    pub layers: Vec<Layer>,
    /// Whether CMD was set in this stage (an inherited CMD is reset by ENTRYPOINT, an own
    /// one is not).
    pub cmd_set_here: bool,
}

impl State {
    /// `FROM scratch`: BuildKit's empty image, which has the default PATH and `/` as its
    /// WORKDIR in its config.
    pub fn scratch(platform: &Platform) -> Self {
        let mut config = ImageConfig {
            architecture: platform.architecture.clone(),
            os: platform.os.clone(),
            variant: platform.variant.clone(),
            ..ImageConfig::default()
        };
        config.config.env = vec![format!("PATH={DEFAULT_PATH}")];
        config.config.working_dir = Some("/".to_owned());
        Self {
            config,
            layers: Vec::new(),
            cmd_set_here: false,
        }
    }

    pub fn from_image(config: ImageConfig, layers: Vec<Layer>) -> Self {
        Self {
            config,
            layers,
            cmd_set_here: false,
        }
    }

    /// A new stage starts from this state: what "this stage" set is forgotten, and so are
    /// the ONBUILD triggers (they run in the child, never in grandchildren).
    pub fn for_new_stage(&self) -> Self {
        let mut next = Self {
            cmd_set_here: false,
            ..self.clone()
        };
        next.config.config.on_build.clear();
        next
    }

    /// The WORKDIR in effect (`/` when none).
    pub fn workdir(&self) -> String {
        self.config
            .config
            .working_dir
            .clone()
            .unwrap_or_else(|| "/".to_owned())
    }

    pub fn shell(&self) -> Vec<String> {
        self.config
            .config
            .shell
            .clone()
            .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()])
    }

    /// `argv` for a command: exec form as is, shell form through SHELL.
    pub fn argv(&self, command: &Command) -> Vec<String> {
        match command {
            Command::Exec(args) => args.clone(),
            Command::Shell(line) => {
                let mut argv = self.shell();
                argv.push(line.clone());
                argv
            }
        }
    }

    pub fn env_value(&self, name: &str) -> Option<&str> {
        self.config
            .config
            .env
            .iter()
            .rev()
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
    }

    /// Adds a layer (or records an empty step) and its history entry.
    /// Adds what one filesystem step produced: a history entry per layer (Docker's rule),
    /// or one marked empty when it produced none.
    pub fn push_layers(&mut self, layers: Vec<Layer>, created_by: &str, created: &str) {
        let count = layers.len();
        if count == 0 {
            self.history(created_by, created, HISTORY_COMMENT.to_owned(), true);
        }
        for (position, layer) in layers.into_iter().enumerate() {
            let comment = if count == 1 {
                HISTORY_COMMENT.to_owned()
            } else {
                format!("{HISTORY_COMMENT} (chunk {} of {count})", position + 1)
            };
            self.history(created_by, created, comment, false);
            self.config.diff_ids.push(layer.diff_id.clone());
            self.layers.push(layer);
        }
    }

    fn history(&mut self, created_by: &str, created: &str, comment: String, empty_layer: bool) {
        self.config.history.push(History {
            created: Some(created.to_owned()),
            created_by: Some(created_by.to_owned()),
            comment: Some(comment),
            empty_layer,
        });
    }

    /// Applies a metadata instruction (already expanded). ARG leaves no trace in the image.
    pub fn apply_metadata(&mut self, step: &InstructionKind, created_by: &str, created: &str) {
        let config = &mut self.config.config;
        match step {
            InstructionKind::Arg(_) => return,
            InstructionKind::Env(pairs) => {
                for (key, value) in pairs {
                    let entry = format!("{key}={value}");
                    let prefix = format!("{key}=");
                    match config.env.iter_mut().find(|e| e.starts_with(&prefix)) {
                        Some(existing) => *existing = entry,
                        None => config.env.push(entry),
                    }
                }
            }
            InstructionKind::Label(pairs) => {
                config.labels.extend(pairs.iter().cloned());
            }
            InstructionKind::Expose(ports) => {
                for port in ports {
                    config.exposed_ports.extend(expand_port(port));
                }
            }
            InstructionKind::Volume(paths) => config.volumes.extend(paths.iter().cloned()),
            InstructionKind::User(user) => config.user = Some(user.clone()),
            InstructionKind::StopSignal(signal) => config.stop_signal = Some(signal.clone()),
            InstructionKind::Shell(shell) => config.shell = Some(shell.clone()),
            InstructionKind::Onbuild(trigger) => config.on_build.push(trigger.clone()),
            InstructionKind::Maintainer(_) => {}
            InstructionKind::Healthcheck(spec) => config.healthcheck = Some(healthcheck(spec)),
            InstructionKind::Cmd(command) => {
                let argv = self.argv(command);
                self.config.config.cmd = Some(argv);
                self.cmd_set_here = true;
            }
            InstructionKind::Entrypoint(command) => {
                let argv = match command {
                    Command::Exec(args) if args.is_empty() => None,
                    other => Some(self.argv(other)),
                };
                self.config.config.entrypoint = argv;
                if !self.cmd_set_here {
                    self.config.config.cmd = None;
                }
            }
            InstructionKind::Workdir(path) => {
                let dir = absolute_workdir(&self.workdir(), path);
                self.config.config.working_dir = Some(dir);
            }
            InstructionKind::Run(_) | InstructionKind::Copy(_) | InstructionKind::Add(_) => {
                unreachable!("filesystem steps are not metadata")
            }
        }
        self.history(created_by, created, HISTORY_COMMENT.to_owned(), true);
    }
}

/// `WORKDIR rel` is relative to the current one, joined and cleaned; an absolute path is
/// kept as written (`/etc/../srv` stays so in the config, as BuildKit has it). Whoever
/// touches the filesystem with it cleans it first.
pub fn absolute_workdir(current: &str, path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        crate::context::dockerignore::clean(&format!("{current}/{path}"))
    }
}

fn healthcheck(spec: &HealthcheckSpec) -> Healthcheck {
    let nanos = |d: &Option<std::time::Duration>| d.map(|d| d.as_nanos() as u64);
    match spec {
        HealthcheckSpec::None => Healthcheck {
            test: vec!["NONE".into()],
            ..Healthcheck::default()
        },
        HealthcheckSpec::Cmd {
            test,
            interval,
            timeout,
            start_period,
            start_interval,
            retries,
        } => Healthcheck {
            test: match test {
                Command::Exec(args) => std::iter::once("CMD".to_owned())
                    .chain(args.iter().cloned())
                    .collect(),
                Command::Shell(line) => vec!["CMD-SHELL".into(), line.clone()],
            },
            interval: nanos(interval),
            timeout: nanos(timeout),
            start_period: nanos(start_period),
            start_interval: nanos(start_interval),
            retries: *retries,
        },
    }
}

/// `8000-8002/udp` → `8000/udp`, `8001/udp`, `8002/udp`; no protocol means tcp.
fn expand_port(spec: &str) -> Vec<String> {
    let (ports, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
    let proto = proto.to_ascii_lowercase();
    match ports.split_once('-') {
        Some((low, high)) => match (low.parse::<u16>(), high.parse::<u16>()) {
            (Ok(low), Ok(high)) if low <= high => {
                (low..=high).map(|p| format!("{p}/{proto}")).collect()
            }
            _ => vec![format!("{ports}/{proto}")],
        },
        None => vec![format!("{ports}/{proto}")],
    }
}

/// RFC 3339 (UTC, seconds) for `created` fields; clamped to `source_date_epoch` if given.
pub fn timestamp(source_date_epoch: Option<i64>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let secs = source_date_epoch.map_or(now, |sde| sde.min(now));
    rfc3339(secs)
}

fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm), valid for the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State::scratch(&Platform::host())
    }

    const T: &str = "2024-01-01T00:00:00Z";

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(timestamp(Some(0)), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn entrypoint_resets_an_inherited_cmd_but_not_its_own_stage_cmd() {
        let mut inherited = state();
        inherited.config.config.cmd = Some(vec!["sh".into()]);
        let mut child = inherited.for_new_stage();
        child.apply_metadata(
            &InstructionKind::Entrypoint(Command::Exec(vec!["/app".into()])),
            "ENTRYPOINT",
            T,
        );
        assert_eq!(child.config.config.cmd, None);

        let mut own = state();
        own.apply_metadata(
            &InstructionKind::Cmd(Command::Exec(vec!["x".into()])),
            "CMD",
            T,
        );
        own.apply_metadata(
            &InstructionKind::Entrypoint(Command::Shell("run".into())),
            "ENTRYPOINT",
            T,
        );
        assert_eq!(own.config.config.cmd, Some(vec!["x".into()]));
        assert_eq!(
            own.config.config.entrypoint,
            Some(vec!["/bin/sh".into(), "-c".into(), "run".into()])
        );
    }

    #[test]
    fn env_replaces_in_place_and_ports_expand() {
        let mut s = state();
        let env = |k: &str, v: &str| InstructionKind::Env(vec![(k.into(), v.into())]);
        s.apply_metadata(&env("A", "1"), "ENV", T);
        s.apply_metadata(&env("B", "2"), "ENV", T);
        s.apply_metadata(&env("A", "3"), "ENV", T);
        assert_eq!(
            s.config.config.env,
            [format!("PATH={DEFAULT_PATH}"), "A=3".into(), "B=2".into()]
        );
        assert_eq!(s.env_value("A"), Some("3"));
        s.apply_metadata(
            &InstructionKind::Expose(vec!["8000-8002/UDP".into(), "80".into()]),
            "EXPOSE",
            T,
        );
        let ports: Vec<&str> = s
            .config
            .config
            .exposed_ports
            .iter()
            .map(String::as_str)
            .collect();
        assert_eq!(ports, ["80/tcp", "8000/udp", "8001/udp", "8002/udp"]);
        assert_eq!(s.config.history.len(), 4);
        assert!(s.config.history.iter().all(|h| h.empty_layer));
    }

    #[test]
    fn scratch_has_the_default_path_and_root_workdir_as_in_buildkit() {
        let s = state();
        assert_eq!(s.env_value("PATH"), Some(DEFAULT_PATH));
        assert_eq!(s.config.config.working_dir.as_deref(), Some("/"));
    }

    #[test]
    fn workdir_is_relative_to_the_current_one() {
        assert_eq!(absolute_workdir("/app", "src/../lib"), "/app/lib");
        assert_eq!(absolute_workdir("/app", "/srv"), "/srv");
        assert_eq!(absolute_workdir("/app", "/etc/../srv"), "/etc/../srv");
        assert_eq!(absolute_workdir("/etc/../srv", "x/.."), "/srv");
    }
}
