//! ARG and ENV scoping, as BuildKit's dispatcher applies it.
//!
//! - ARGs before the first FROM (global) are visible to FROM lines only; a stage sees one when it
//!   redeclares it without a default, and then gets the global value.
//! - A `--build-arg` overrides the value of a declared ARG, global or in a stage.
//! - ENV and an ARG that has a value set the same variables, in order: the later one wins in
//!   RUN and in expansion (`ENV X=a` then `ARG X=b` gives `b`), and both go on with
//!   `FROM <stage>`, as BuildKit's dispatcher adds both to its state's environment. Only ENV
//!   reaches the image config (the engine's business).
//! - The proxy ARGs reach RUN from `--build-arg` without any declaration.

use std::collections::BTreeMap;

use crate::frontend::shell::Env;

/// ARGs that RUN sees whenever they are given as build args, declared or not.
pub(crate) const PROXY_ARGS: [&str; 10] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// The automatic platform ARGs BuildKit declares globally (`BUILDPLATFORM`, `TARGETARCH`, ...),
/// for the machine the daemon runs on; a stage sees them when it declares them.
pub(super) fn platform_args() -> Vec<(String, String)> {
    let os = std::env::consts::OS;
    let (arch, variant) = match std::env::consts::ARCH {
        "x86_64" => ("amd64", ""),
        "aarch64" => ("arm64", ""),
        "x86" => ("386", ""),
        "arm" => ("arm", "v7"),
        "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", ""),
        "powerpc64" => ("ppc64", ""),
        other => (other, ""),
    };
    let platform = match variant {
        "" => format!("{os}/{arch}"),
        _ => format!("{os}/{arch}/{variant}"),
    };
    let mut args = Vec::new();
    for side in ["BUILD", "TARGET"] {
        args.push((format!("{side}PLATFORM"), platform.clone()));
        args.push((format!("{side}OS"), os.to_owned()));
        args.push((format!("{side}ARCH"), arch.to_owned()));
        args.push((format!("{side}VARIANT"), variant.to_owned()));
    }
    args
}

/// Declared ARGs: a declaration without default and without build arg is set to nothing, so
/// `${A-x}` still gives `x`.
#[derive(Debug, Clone, Default)]
pub(super) struct Args(BTreeMap<String, Option<String>>);

impl Args {
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.as_deref())
    }

    pub(super) fn declare(&mut self, name: &str, value: Option<String>) {
        self.0.insert(name.to_owned(), value);
    }
}

impl Env for Args {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name)
    }
}

/// The variables of one stage at one point of its instructions.
#[derive(Debug, Clone)]
pub(super) struct Scope<'a> {
    /// What ENV and ARGs with a value set so far (and what the stage inherited).
    pub(super) env: BTreeMap<String, String>,
    build_args: &'a [(String, String)],
}

impl<'a> Scope<'a> {
    pub(super) fn build_args(&self) -> &'a [(String, String)] {
        self.build_args
    }

    /// A stage's scope, starting from the ENV it inherits.
    pub(super) fn new(env: BTreeMap<String, String>, build_args: &'a [(String, String)]) -> Self {
        Scope { env, build_args }
    }

    /// An `ARG` with a value sets its variable over whatever ENV set (one without a value
    /// leaves it as it is).
    pub(super) fn declare_arg(&mut self, name: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.env.insert(name.to_owned(), value.to_owned());
        }
    }

    /// Everything a RUN step sees, sorted: the variables, then proxy build args nothing
    /// else set.
    pub(super) fn run_env(&self) -> Vec<(String, String)> {
        let mut all = self.env.clone();
        for name in PROXY_ARGS {
            if let Some(v) = build_arg(self.build_args, name) {
                all.entry(name.to_owned()).or_insert_with(|| v.to_owned());
            }
        }
        all.into_iter().collect()
    }
}

impl Env for Scope<'_> {
    fn lookup(&self, name: &str) -> Option<&str> {
        self.env.get(name).map(String::as_str)
    }
}

/// The value an `ARG name[=default]` takes: the build arg, else the default (already
/// expanded), else, for a bare redeclaration, the global value.
pub(super) fn arg_value(
    build_args: &[(String, String)],
    name: &str,
    default: Option<String>,
    globals: &Args,
) -> Option<String> {
    build_arg(build_args, name)
        .map(str::to_owned)
        .or(default)
        .or_else(|| globals.get(name).map(str::to_owned))
}

/// The last `--build-arg` given for `name`.
pub(super) fn build_arg<'b>(build_args: &'b [(String, String)], name: &str) -> Option<&'b str> {
    build_args
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}
