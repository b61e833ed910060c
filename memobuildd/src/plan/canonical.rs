//! The identity of a node as text: the canonical instruction that keys it and its label.

use crate::frontend::{Command, Healthcheck, Heredoc, InstructionKind};

/// JSON text of strings and lists of strings, which always serialize.
pub(super) fn json(value: &(impl serde::Serialize + ?Sized)) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn json_command(command: &Command) -> String {
    match command {
        Command::Exec(args) => json(args),
        Command::Shell(line) => json(line),
    }
}

/// The canonical text of an expanded instruction: keyword, flags in a fixed order, JSON
/// arguments, heredocs. Two steps with the same text do the same thing.
pub(super) fn canonical(kind: &InstructionKind) -> String {
    let mut out = kind.keyword().to_owned();
    let mut flag = |name: &str, value: Option<&String>| {
        if let Some(value) = value {
            out.push_str(&format!(" --{name}={}", json(value)));
        }
    };
    let mut heredocs: &[Heredoc] = &[];
    let args = match kind {
        InstructionKind::Run(run) => {
            run.mounts.iter().for_each(|m| flag("mount", Some(m)));
            flag("network", run.network.as_ref());
            flag("security", run.security.as_ref());
            heredocs = &run.heredocs;
            json_command(&run.command)
        }
        InstructionKind::Cmd(c) | InstructionKind::Entrypoint(c) => json_command(c),
        InstructionKind::Copy(c) | InstructionKind::Add(c) => {
            flag("from", c.from.as_ref());
            flag("chown", c.chown.as_ref());
            flag("chmod", c.chmod.as_ref());
            flag("link", c.link.then(|| "true".to_owned()).as_ref());
            flag("parents", c.parents.then(|| "true".to_owned()).as_ref());
            c.exclude.iter().for_each(|e| flag("exclude", Some(e)));
            flag("checksum", c.checksum.as_ref());
            flag(
                "keep-git-dir",
                c.keep_git_dir.then(|| "true".to_owned()).as_ref(),
            );
            heredocs = &c.heredocs;
            json(&[&c.sources[..], std::slice::from_ref(&c.dest)].concat())
        }
        InstructionKind::Env(pairs) | InstructionKind::Label(pairs) => json(
            &pairs
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        ),
        InstructionKind::Arg(decls) => json(
            &decls
                .iter()
                .map(|d| (&d.name, &d.default))
                .collect::<Vec<_>>(),
        ),
        InstructionKind::Shell(v) | InstructionKind::Expose(v) | InstructionKind::Volume(v) => {
            json(v)
        }
        InstructionKind::User(s)
        | InstructionKind::Workdir(s)
        | InstructionKind::StopSignal(s)
        | InstructionKind::Maintainer(s)
        | InstructionKind::Onbuild(s) => json(s),
        InstructionKind::Healthcheck(Healthcheck::None) => "NONE".to_owned(),
        InstructionKind::Healthcheck(Healthcheck::Cmd {
            test,
            interval,
            timeout,
            start_period,
            start_interval,
            retries,
        }) => {
            let durations = [interval, timeout, start_period, start_interval];
            let durations: Vec<Option<u128>> =
                durations.iter().map(|d| d.map(|d| d.as_nanos())).collect();
            format!("CMD {} {durations:?} {retries:?}", json_command(test))
        }
    };
    out.push(' ');
    out.push_str(&args);
    for doc in heredocs {
        let mode = if doc.expand { "expand" } else { "literal" };
        out.push_str(&format!(
            "\n<<{} {mode} {}",
            json(&doc.name),
            json(&doc.body)
        ));
    }
    out
}

/// `RUN make`, `COPY src/ /app/`: the keyword and the gist, first line only, bounded.
pub(super) fn label(kind: &InstructionKind) -> String {
    let gist = match kind {
        InstructionKind::Run(run) => command_gist(&run.command),
        InstructionKind::Cmd(c) | InstructionKind::Entrypoint(c) => command_gist(c),
        InstructionKind::Copy(c) | InstructionKind::Add(c) => {
            let from = c
                .from
                .as_ref()
                .map(|f| format!("--from={f} "))
                .unwrap_or_default();
            let docs = c.heredocs.iter().map(|d| format!("<<{}", d.name));
            let sources: Vec<String> = c.sources.iter().cloned().chain(docs).collect();
            format!("{from}{} {}", sources.join(" "), c.dest)
        }
        InstructionKind::Env(pairs) | InstructionKind::Label(pairs) => pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        InstructionKind::Arg(decls) => decls
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        InstructionKind::Shell(v) | InstructionKind::Expose(v) | InstructionKind::Volume(v) => {
            v.join(" ")
        }
        InstructionKind::User(s)
        | InstructionKind::Workdir(s)
        | InstructionKind::StopSignal(s)
        | InstructionKind::Maintainer(s)
        | InstructionKind::Onbuild(s) => s.clone(),
        InstructionKind::Healthcheck(Healthcheck::None) => "NONE".to_owned(),
        InstructionKind::Healthcheck(Healthcheck::Cmd { test, .. }) => {
            format!("CMD {}", command_gist(test))
        }
    };
    let gist = gist.lines().next().unwrap_or("");
    let mut label = format!("{} {gist}", kind.keyword());
    if label.chars().count() > 72 {
        label = label.chars().take(71).collect::<String>() + "…";
    }
    label
}

fn command_gist(command: &Command) -> String {
    match command {
        Command::Exec(args) => args.join(" "),
        Command::Shell(line) => line.clone(),
    }
}
