//! The differential conformance suite: every case under `tests/conformance/` is built by
//! MemoBuild and by the BuildKit of a private dockerd (Debian's docker.io), from the same
//! context and the same busybox base, and the two images must agree on every path of the
//! root filesystem (type, mode, owner, size, content, link target, xattrs, hard links) and
//! on the config fields that matter — except the differences `tests/conformance/allow-list`
//! names, each a bug of that old BuildKit fixed upstream since.
//!
//! `MEMOBUILD_CONFORMANCE_CASES=a,b` runs only those cases (for working on one).

use std::path::{Path, PathBuf};
use std::time::Instant;

use memobuild_tests::bench::{Bench, tail};
use memobuild_tests::conformance::{self, AllowList, Case, Image, Side};
use memobuild_tests::docker::TestDocker;
use memobuild_tests::{REQUIRE_PRIVILEGED_ENV, privileged, texts};

/// The issue asks for at least this many cases of our own.
const MIN_CASES: usize = 40;

#[test]
fn memobuild_builds_what_buildkit_builds() {
    let test = "memobuild_builds_what_buildkit_builds";
    if !privileged(test) {
        return;
    }
    let docker = match TestDocker::start() {
        Ok(docker) => docker,
        Err(reason) => {
            assert!(
                std::env::var_os(REQUIRE_PRIVILEGED_ENV).is_none(),
                "{test}: no Docker daemon, and CI must not skip: {reason}"
            );
            eprintln!("SKIPPED {test}: {reason}");
            return;
        }
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance");
    let allow = AllowList::parse(
        &std::fs::read_to_string(root.join("allow-list")).expect("tests/conformance/allow-list"),
    )
    .expect("allow-list");
    let only = std::env::var("MEMOBUILD_CONFORMANCE_CASES").ok();
    let cases = conformance::cases(&root, only.as_deref());
    if only.is_none() {
        assert!(
            cases.len() >= MIN_CASES,
            "only {} conformance cases",
            cases.len()
        );
    }
    let bench = Bench::start();
    let base = format!("{}:latest", bench.base);
    docker
        .load_from_registry(&base)
        .unwrap_or_else(|e| panic!("giving BuildKit the base image: {e}"));
    let work = tempfile::Builder::new()
        .prefix("mbconf")
        .tempdir()
        .expect("work dir");

    let started = Instant::now();
    // The two tools build side by side: most of either's time is waiting on runc.
    let (ours, theirs) = std::thread::scope(|scope| {
        let buildkit = scope.spawn(|| {
            cases
                .iter()
                .map(|case| build_with_buildkit(&docker, case, &base, work.path()))
                .collect::<Vec<_>>()
        });
        let ours: Vec<_> = cases
            .iter()
            .map(|case| build_with_memobuild(&bench, case, &base, work.path()))
            .collect();
        (ours, buildkit.join().expect("BuildKit side"))
    });
    let elapsed = started.elapsed();

    let mut report = String::new();
    let mut failures = 0;
    let mut identical = 0;
    let mut used = vec![false; allow.entries.len()];
    for ((case, ours), theirs) in cases.iter().zip(ours).zip(theirs) {
        let (ours, theirs) = match (ours, theirs) {
            (Ok(ours), Ok(theirs)) => (ours, theirs),
            (ours, theirs) => {
                failures += 1;
                for (side, result) in [("MemoBuild", ours.err()), ("BuildKit", theirs.err())] {
                    if let Some(why) = result {
                        report.push_str(&format!("{}: {side} failed:\n{why}\n", case.name));
                    }
                }
                continue;
            }
        };
        let mut unexpected = Vec::new();
        let mut allowed = 0;
        for difference in conformance::differences(&ours, &theirs) {
            match allow.allows(&case.name, &difference.field) {
                Some(entry) => {
                    allowed += 1;
                    let index = allow
                        .entries
                        .iter()
                        .position(|e| e == entry)
                        .expect("entry");
                    used[index] = true;
                }
                None => unexpected.push(difference),
            }
        }
        if unexpected.is_empty() {
            if allowed == 0 {
                identical += 1;
            }
            report.push_str(&format!(
                "{}: same{}\n",
                case.name,
                if allowed > 0 {
                    format!(" but for {allowed} allow-listed difference(s)")
                } else {
                    String::new()
                }
            ));
        } else {
            failures += 1;
            report.push_str(&format!(
                "{}: DIFFERS ({} path(s) or field(s))\n{}",
                case.name,
                unexpected.len(),
                conformance::render(&case.name, &unexpected)
            ));
        }
    }
    let ran: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    for (entry, used) in allow.entries.iter().zip(used) {
        if !used && ran.contains(&entry.case.as_str()) {
            failures += 1;
            report.push_str(&format!(
                "stale allow-list entry: {} {} no longer differs\n",
                entry.case, entry.field
            ));
        }
    }
    eprintln!(
        "{report}conformance: {} cases, {identical} identical, {} allow-list entries, {failures} failing, {:.1}s",
        cases.len(),
        allow.entries.len(),
        elapsed.as_secs_f64()
    );
    assert_eq!(failures, 0, "conformance differences:\n{report}");
}

fn build_with_memobuild(
    bench: &Bench,
    case: &Case,
    base: &str,
    work: &Path,
) -> Result<Image, String> {
    let ctx = conformance::stage_context(
        case,
        Side::MemoBuild,
        base,
        &work.join(format!("{}-memobuild", case.name)),
    );
    let out = work.join(format!("{}-memobuild.tar", case.name));
    let dest = format!("type=docker,dest={}", out.display());
    let output = bench
        .daemon
        .client()
        .args([
            "build",
            "--progress",
            "plain",
            "--network",
            "host",
            "-o",
            &dest,
        ])
        .arg("-f")
        .arg(ctx.join("Dockerfile"))
        .args(["-t", &format!("conformance-{}", case.name)])
        .args(&case.args)
        .arg(&ctx)
        .output()
        .expect("run memobuild");
    if !output.status.success() {
        let (_, stderr) = texts(&output);
        return Err(format!(
            "{}\ndaemon log:\n{}",
            tail(&stderr),
            tail(&bench.daemon.log_text())
        ));
    }
    conformance::read_docker_archive(&out)
}

fn build_with_buildkit(
    docker: &TestDocker,
    case: &Case,
    base: &str,
    work: &Path,
) -> Result<Image, String> {
    let ctx: PathBuf = conformance::stage_context(
        case,
        Side::BuildKit,
        base,
        &work.join(format!("{}-buildkit", case.name)),
    );
    let tag = format!("conformance-{}", case.name);
    let output = docker
        .command()
        .args(["build", "--progress", "plain", "--network=host", "-t", &tag])
        .arg("-f")
        .arg(ctx.join("Dockerfile"))
        .args(&case.args)
        .arg(&ctx)
        .output()
        .expect("run docker build");
    if !output.status.success() {
        let (_, stderr) = texts(&output);
        return Err(format!("{}\n{}", tail(&stderr), docker.log()));
    }
    let out = work.join(format!("{}-buildkit.tar", case.name));
    let save = docker.run(&["save", "-o", &out.to_string_lossy(), &tag]);
    if !save.status.success() {
        return Err(format!("docker save: {:?}", texts(&save)));
    }
    conformance::read_docker_archive(&out)
}
