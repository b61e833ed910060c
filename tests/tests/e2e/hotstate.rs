//! The hot state never lies: a workspace kept hot by the watcher builds exactly what a cold
//! scan of the same files builds, whatever happened to them — checked by a seeded random
//! sequence of filesystem mutations, built after each round by a watching daemon and by a
//! daemon that scans per build (`watch_built_contexts = false`), outputs compared.
//!
//! `MEMOBUILD_HOT_ROUNDS` sets the number of rounds (200 by default), `MEMOBUILD_HOT_SEED` the
//! seed (the time by default; printed either way, so a failure can be replayed), and
//! `MEMOBUILD_HOT_OP=N` repeats one kind of mutation only (to chase a failure).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use memobuild_tests::bench::{Listing, tail, tar_listing};
use memobuild_tests::{TestDaemon, texts};

/// The Dockerfile lives outside the context, so deleting the context root loses nothing else.
const DOCKERFILE: &str = "FROM scratch\nCOPY . /ctx/\n";
const DIRS: &[&str] = &["a", "b", "a/deep", "b/deep/er", "c"];
const IGNORES: &[&str] = &[
    "",
    "*.log\n",
    "a/deep\n",
    "b/*\n!b/keep*\n",
    "**/*.tmp\nc\n",
];

/// xorshift64*: small, seedable, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len())])
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| b'a' + (self.next() % 26) as u8).collect()
    }
}

/// Both daemons and the places they build.
struct Pair {
    hot: TestDaemon,
    cold: TestDaemon,
    ctx: PathBuf,
    dockerfile: PathBuf,
    /// Outside the context: where files are moved out to, and back from.
    outside: PathBuf,
    builds: u64,
}

impl Pair {
    fn start() -> Self {
        let hot = TestDaemon::start();
        let config = hot.dir.path().join("scan-per-build.toml");
        std::fs::write(&config, "watch_built_contexts = false\n").expect("config");
        let cold = TestDaemon::start_with(|cmd| {
            cmd.arg("--config").arg(&config);
        });
        let ctx = hot.dir.path().join("ctx");
        let dockerfile = hot.dir.path().join("df/Dockerfile");
        let outside = hot.dir.path().join("outside");
        for dir in [&ctx, &outside, &dockerfile.parent().expect("df").to_owned()] {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        std::fs::write(&dockerfile, DOCKERFILE).expect("Dockerfile");
        Self {
            hot,
            cold,
            ctx,
            dockerfile,
            outside,
            builds: 0,
        }
    }

    fn build(&mut self, daemon_is_hot: bool) -> Result<Listing, String> {
        let daemon = if daemon_is_hot { &self.hot } else { &self.cold };
        self.builds += 1;
        let out = self.hot.dir.path().join(format!("out-{}.tar", self.builds));
        let output = daemon
            .client()
            .args(["build", "--progress", "quiet", "-f"])
            .arg(&self.dockerfile)
            .arg("-o")
            .arg(format!("type=tar,dest={}", out.display()))
            .arg(&self.ctx)
            .output()
            .expect("memobuild build");
        let (_, stderr) = texts(&output);
        if !output.status.success() {
            return Err(format!(
                "{} build failed: {stderr}",
                if daemon_is_hot { "hot" } else { "cold" }
            ));
        }
        let listing = tar_listing(&out);
        std::fs::remove_file(&out).expect("rm output");
        Ok(listing)
    }

    /// Builds with both daemons and fails the test with the difference if they disagree.
    fn compare(&mut self, seed: u64, round: usize, log: &[String]) {
        let fail = |pair: &Self, what: String| -> ! {
            panic!(
                "seed {seed}, round {round}: {what}\nmutations so far (last rounds last): \
                 {log:#?}\nhot daemon log:\n{}",
                tail(&pair.hot.log_text())
            )
        };
        let (hot, cold) = match (self.build(true), self.build(false)) {
            (Ok(hot), Ok(cold)) => (hot, cold),
            (Err(err), _) | (_, Err(err)) => fail(self, err),
        };
        if hot != cold {
            let mut diff = Vec::new();
            for (path, cold_entry) in &cold {
                match hot.get(path) {
                    Some(hot_entry) if hot_entry == cold_entry => {}
                    other => diff.push(format!("{path}: hot {other:?}, cold {cold_entry}")),
                }
            }
            for (path, hot_entry) in &hot {
                if !cold.contains_key(path) {
                    diff.push(format!("{path}: hot {hot_entry}, cold absent"));
                }
            }
            fail(
                self,
                format!(
                    "the hot daemon diverged from a cold scan:\n{}",
                    diff.join("\n")
                ),
            );
        }
    }
}

/// Every path below `root` (relative), split into files (and links) and directories.
fn inventory(root: &Path) -> (Vec<String>, Vec<String>) {
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .expect("inside")
                .display()
                .to_string();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
                dirs.push(rel);
            } else {
                files.push(rel);
            }
        }
    }
    files.sort();
    dirs.sort();
    (files, dirs)
}

fn copy_tree(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

/// Applies one random mutation; returns what it did, for the failure report.
fn mutate(pair: &Pair, rng: &mut Rng) -> String {
    let ctx = &pair.ctx;
    let (files, dirs) = inventory(ctx);
    let regular: Vec<&String> = files
        .iter()
        .filter(|f| std::fs::symlink_metadata(ctx.join(f)).is_ok_and(|m| m.file_type().is_file()))
        .collect();
    let random_dir = |rng: &mut Rng| -> PathBuf {
        let dir = match rng.below(3) {
            0 => String::new(),
            1 => rng.pick(DIRS).map(|d| (*d).to_owned()).unwrap_or_default(),
            _ => rng.pick(&dirs).cloned().unwrap_or_default(),
        };
        let path = ctx.join(dir);
        std::fs::create_dir_all(&path).expect("mkdir -p");
        path
    };
    let new_name = |rng: &mut Rng| -> String {
        let stem = ["f", "keep", "x", "log", "n"][rng.below(5)];
        let ext = ["", ".txt", ".log", ".tmp", ".js"][rng.below(5)];
        format!("{stem}{}{ext}", rng.below(40))
    };
    let op = env_u64("MEMOBUILD_HOT_OP").map_or_else(|| rng.below(16), |op| op as usize);
    match op {
        0 | 1 => {
            let path = random_dir(rng).join(new_name(rng));
            // A link renamed to this name earlier would be written through.
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
                std::fs::remove_file(&path).expect("rm link");
            }
            if path.is_dir() {
                return "new: a directory is there".into();
            }
            let len = rng.below(300);
            std::fs::write(&path, rng.bytes(len)).expect("write");
            format!("new {}", path.display())
        }
        2 => match rng.pick(&regular) {
            Some(file) => {
                let len = rng.below(300) + 1;
                std::fs::write(ctx.join(file), rng.bytes(len)).expect("edit");
                format!("edit {file}")
            }
            None => "edit: nothing".into(),
        },
        3 => match rng.pick(&regular) {
            Some(file) => {
                let path = ctx.join(file);
                let meta = std::fs::metadata(&path).expect("meta");
                let mtime = meta.modified().expect("mtime");
                let len = meta.len() as usize;
                std::fs::write(&path, rng.bytes(len)).expect("same-size edit");
                std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .expect("open")
                    .set_modified(mtime)
                    .expect("restore mtime");
                format!("same-size edit, mtime restored: {file}")
            }
            None => "same-size edit: nothing".into(),
        },
        4 => match rng.pick(&files) {
            Some(file) => {
                std::fs::remove_file(ctx.join(file)).expect("rm");
                format!("rm {file}")
            }
            None => "rm: nothing".into(),
        },
        5 => {
            let path = random_dir(rng).join(format!("d{}", rng.below(9)));
            std::fs::create_dir_all(path.join("sub")).expect("mkdir");
            std::fs::write(path.join("sub/inner.txt"), rng.bytes(20)).expect("inner");
            format!("mkdir {}", path.display())
        }
        6 => match rng.pick(&dirs) {
            Some(dir) => {
                std::fs::remove_dir_all(ctx.join(dir)).expect("rm -r");
                format!("rm -r {dir}")
            }
            None => "rm -r: nothing".into(),
        },
        7 => match rng.pick(&files) {
            Some(file) => {
                let to = random_dir(rng).join(new_name(rng));
                std::fs::rename(ctx.join(file), &to).expect("mv");
                format!("mv {file} {}", to.display())
            }
            None => "mv: nothing".into(),
        },
        8 => match rng.pick(&dirs) {
            Some(dir) => {
                let to = ctx.join(format!("moved{}", rng.below(9)));
                if to.starts_with(ctx.join(dir)) || to.exists() {
                    return "mv dir: skipped".into();
                }
                std::fs::rename(ctx.join(dir), &to).expect("mv dir");
                format!("mv {dir} {}", to.display())
            }
            None => "mv dir: nothing".into(),
        },
        9 => {
            let top: Vec<&String> = dirs.iter().filter(|d| !d.contains('/')).collect();
            if top.len() < 2 {
                return "swap: fewer than two dirs".into();
            }
            let (a, b) = (top[0], top[1]);
            let tmp = ctx.join(".swap");
            std::fs::rename(ctx.join(a), &tmp).expect("a → tmp");
            std::fs::rename(ctx.join(b), ctx.join(a)).expect("b → a");
            std::fs::rename(&tmp, ctx.join(b)).expect("tmp → b");
            format!("swap {a} {b}")
        }
        10 => match rng.pick(&regular) {
            Some(file) => {
                // An editor's atomic save: a temp beside the file, renamed over it.
                let path = ctx.join(file);
                let temp = path.with_file_name(format!(".saving{}", rng.below(1000)));
                let len = rng.below(200);
                std::fs::write(&temp, rng.bytes(len)).expect("temp");
                std::fs::rename(&temp, &path).expect("rename over");
                format!("atomic save {file}")
            }
            None => "atomic save: nothing".into(),
        },
        11 => match rng.pick(&regular) {
            Some(file) => {
                use std::os::unix::fs::PermissionsExt;
                let mode = [0o644, 0o755, 0o600, 0o4755][rng.below(4)];
                std::fs::set_permissions(ctx.join(file), std::fs::Permissions::from_mode(mode))
                    .expect("chmod");
                format!("chmod {mode:o} {file}")
            }
            None => "chmod: nothing".into(),
        },
        12 => {
            let path = random_dir(rng).join(format!("link{}", rng.below(20)));
            let target = rng
                .pick(&files)
                .cloned()
                .unwrap_or_else(|| "dangling".into());
            let _ = std::fs::remove_file(&path);
            if path.exists() {
                return "symlink: a directory is there".into();
            }
            std::os::unix::fs::symlink(&target, &path).expect("symlink");
            format!("ln -s {target} {}", path.display())
        }
        13 => {
            let rules = rng.pick(IGNORES).copied().unwrap_or_default();
            std::fs::write(ctx.join(".dockerignore"), rules).expect("ignore");
            format!(".dockerignore = {rules:?}")
        }
        14 => {
            // The root deleted and recreated, or renamed away and a copy put back.
            let away = pair.outside.join(format!("root{}", rng.below(1_000_000)));
            if rng.below(2) == 0 {
                copy_tree(ctx, &away);
                std::fs::remove_dir_all(ctx).expect("rm -rf root");
                copy_tree(&away, ctx);
                std::fs::remove_dir_all(&away).expect("rm copy");
                "root deleted and recreated".into()
            } else {
                std::fs::rename(ctx, &away).expect("root away");
                copy_tree(&away, ctx);
                std::fs::remove_dir_all(&away).expect("rm old root");
                "root renamed away, a copy put back".into()
            }
        }
        _ => {
            // A file out of the tree and (another one) back in.
            let (parked, _) = inventory(&pair.outside);
            let parked: Vec<&String> = parked.iter().filter(|p| !p.contains('/')).collect();
            match (rng.below(2), rng.pick(&parked), rng.pick(&regular)) {
                (0, Some(back), _) => {
                    let to = random_dir(rng).join(back.as_str());
                    std::fs::rename(pair.outside.join(back), &to).expect("back in");
                    format!("moved {back} back in as {}", to.display())
                }
                (_, _, Some(file)) => {
                    let name = format!("parked{}", rng.below(1_000_000));
                    std::fs::rename(ctx.join(file), pair.outside.join(&name)).expect("out");
                    format!("moved {file} out as {name}")
                }
                _ => "move out/in: nothing".into(),
            }
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn random_edits_never_make_the_hot_state_differ_from_a_cold_scan() {
    let rounds = env_u64("MEMOBUILD_HOT_ROUNDS").unwrap_or(200) as usize;
    let seed = env_u64("MEMOBUILD_HOT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    }) | 1;
    eprintln!(
        "hot-state differential: seed {seed}, {rounds} rounds (MEMOBUILD_HOT_SEED to replay)"
    );
    let started = Instant::now();
    let mut pair = Pair::start();
    let mut rng = Rng(seed);
    for dir in DIRS {
        std::fs::create_dir_all(pair.ctx.join(dir)).expect("dirs");
    }
    for i in 0..20 {
        let dir = rng.pick(DIRS).copied().unwrap_or_default();
        std::fs::write(pair.ctx.join(dir).join(format!("f{i}.txt")), rng.bytes(50)).expect("seed");
    }
    pair.compare(seed, 0, &[]);
    let mut log: Vec<String> = Vec::new();
    for round in 1..=rounds {
        let count = 1 + rng.below(4);
        log.push(format!("-- round {round}"));
        log.extend((0..count).map(|_| mutate(&pair, &mut rng)));
        // The report shows the last few rounds.
        let keep_from = log.len().saturating_sub(24);
        log.drain(..keep_from);
        pair.compare(seed, round, &log);
    }
    eprintln!(
        "hot-state differential: seed {seed}, {rounds} rounds, 0 divergences, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_git_checkout_of_a_thousand_changed_files_builds_as_a_cold_scan_does() {
    let mut pair = Pair::start();
    let ctx = pair.ctx.clone();
    let git = |args: &[&str]| {
        let output = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "init.defaultBranch=one",
            ])
            .args(args)
            .current_dir(&ctx)
            .output()
            .expect("git");
        assert!(
            output.status.success(),
            "git {args:?}: {:?}",
            texts(&output)
        );
    };
    for i in 0..1_000 {
        let dir = pair.ctx.join(format!("src/m{}", i % 37));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join(format!("f{i}.txt")), format!("one {i}")).expect("file");
    }
    std::fs::write(pair.ctx.join(".dockerignore"), ".git\n").expect("ignore");
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-qm", "one"]);
    git(&["checkout", "-qb", "two"]);
    for i in 0..1_000 {
        let file = pair.ctx.join(format!("src/m{}/f{i}.txt", i % 37));
        if i % 10 == 0 {
            std::fs::remove_file(file).expect("rm");
        } else {
            std::fs::write(file, format!("two {i}")).expect("edit");
        }
    }
    git(&["add", "-A"]);
    git(&["commit", "-qm", "two"]);
    git(&["checkout", "-q", "one"]);
    pair.compare(0, 0, &["on branch one".into()]);
    git(&["checkout", "-q", "two"]);
    pair.compare(0, 1, &["checked out branch two".into()]);
    git(&["checkout", "-q", "one"]);
    pair.compare(0, 2, &["back to branch one".into()]);
}

#[test]
fn a_replaced_root_builds_as_a_cold_scan_does() {
    let mut pair = Pair::start();
    std::fs::create_dir_all(pair.ctx.join("src")).expect("src");
    std::fs::write(pair.ctx.join("src/a.txt"), "one").expect("a");
    pair.compare(0, 0, &["first build".into()]);
    let template = pair.outside.join("template");
    copy_tree(&pair.ctx, &template);
    std::fs::write(template.join("src/a.txt"), "two").expect("edit template");

    std::fs::remove_dir_all(&pair.ctx).expect("rm -rf");
    copy_tree(&template, &pair.ctx);
    pair.compare(0, 1, &["deleted and recreated".into()]);

    let away = pair.outside.join("away");
    std::fs::rename(&pair.ctx, &away).expect("away");
    std::fs::write(away.join("src/b.txt"), "written while away").expect("b");
    std::fs::rename(&away, &pair.ctx).expect("back");
    pair.compare(0, 2, &["renamed away and back".into()]);

    let elsewhere = pair.outside.join("elsewhere");
    copy_tree(&template, &elsewhere);
    std::fs::write(elsewhere.join("src/c.txt"), "only here").expect("c");
    std::fs::remove_dir_all(&pair.ctx).expect("rm");
    std::os::unix::fs::symlink(&elsewhere, &pair.ctx).expect("symlink");
    pair.compare(0, 3, &["replaced by a symlink".into()]);
    let listing = pair.build(true).expect("build");
    assert!(listing.contains_key("ctx/src/c.txt"), "{listing:?}");
}

/// The build of the issue that found it: a COPY after a slow RUN, its file edited during the
/// RUN. Nothing may be recorded under the key of the content the build started with.
#[test]
fn an_edit_during_a_build_is_never_recorded_under_the_old_content() {
    use memobuild_tests::privileged;
    if !privileged("an_edit_during_a_build_is_never_recorded_under_the_old_content") {
        return;
    }
    let daemon = TestDaemon::start();
    let ctx = daemon.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::copy("/bin/busybox", ctx.join("busybox")).expect("busybox-static");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sleep\", \"3\"]\nCOPY app.txt /app.txt\n",
    )
    .expect("Dockerfile");
    std::fs::write(ctx.join("app.txt"), "v2").expect("v2");
    let out = daemon.dir.path().join("out.tar");
    let build = || {
        let output = daemon
            .client()
            .args(["build", "--progress", "plain", "-o"])
            .arg(format!("type=tar,dest={}", out.display()))
            .arg(&ctx)
            .output()
            .expect("build");
        let (_, stderr) = texts(&output);
        (output.status.success(), stderr)
    };
    let mut running = daemon
        .client()
        .args(["build", "--progress", "plain"])
        .arg(&ctx)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("build");
    // While the RUN sleeps: status shows the build at its RUN, then the file changes.
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let status = daemon.run_client(&["status", "--json"]);
        let status: serde_json::Value =
            serde_json::from_slice(&status.stdout).expect("status json");
        let step = status["builds"][0]["step"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        if step.contains("RUN") {
            assert_eq!(status["builds_active"], 1, "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never saw the RUN running: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::fs::write(ctx.join("app.txt"), "v3").expect("v3 during the RUN");
    let finished = memobuild_tests::wait_bounded(&mut running, std::time::Duration::from_secs(60));
    let mut stderr = String::new();
    std::io::Read::read_to_string(running.stderr.as_mut().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(
        !finished.success(),
        "the COPY must not take v3 for v2: {stderr}"
    );
    assert!(stderr.contains("app.txt changed"), "{stderr}");

    std::fs::write(ctx.join("app.txt"), "v2").expect("revert");
    let (ok, stderr) = build();
    assert!(ok, "{stderr}");
    let listing = tar_listing(&out);
    assert_eq!(
        listing["app.txt"],
        memobuild_tests::bench::describe(
            "file",
            0o644,
            0,
            0,
            &memobuild_tests::bench::content_of("v2")
        ),
        "{stderr}"
    );
}
