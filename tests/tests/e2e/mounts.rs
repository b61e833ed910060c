//! `RUN --mount`: cache mounts kept by the daemon across builds and restarts, out of every
//! layer, shared or taken in turns, counted and pruned; tmpfs mounts; and flags MemoBuild
//! does not implement refused at their line.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memobuild_tests::bench::{Bench, executed, tail};
use memobuild_tests::{privileged, texts};

/// Builds `ctx` into a local directory (`-o type=local`) and returns it.
fn build_local(bench: &Bench, ctx: &Path, name: &str, args: &[&str]) -> PathBuf {
    let dest = bench.daemon.dir.path().join(name);
    let output = format!("type=local,dest={}", dest.display());
    let mut all = vec!["-o", output.as_str()];
    all.extend_from_slice(args);
    bench.build_ok(ctx, &all);
    dest
}

fn cache_stats(bench: &Bench) -> serde_json::Value {
    let output = bench.daemon.run_client(&["cache", "stats", "--json"]);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stderr}");
    serde_json::from_str(&stdout).expect("cache stats JSON")
}

/// What the cache mount held when the build with `N=n` ran; checks that neither the
/// cache's content nor its mount point reached the image.
fn seen(bench: &Bench, ctx: &Path, n: u32) -> Vec<String> {
    let root = build_local(
        bench,
        ctx,
        &format!("out-{n}"),
        &["--build-arg", &format!("N={n}")],
    );
    assert!(
        !root.join("var/cache/app").exists(),
        "the mount point leaked into a layer"
    );
    let seen = std::fs::read_to_string(root.join("seen")).expect("/seen");
    seen.split_whitespace().map(str::to_owned).collect()
}

const CACHE: &str = "\
FROM BASE
ARG N
RUN --mount=type=cache,target=/var/cache/app \\
    ls /var/cache/app > /seen && echo $N > /var/cache/app/run-$N
";

#[test]
fn a_cache_mount_persists_across_builds_and_restarts_stays_out_of_layers_and_is_pruned() {
    if !privileged(
        "a_cache_mount_persists_across_builds_and_restarts_stays_out_of_layers_and_is_pruned",
    ) {
        return;
    }
    let mut bench = Bench::start();
    let ctx = bench.context("cache", &[("Dockerfile", CACHE)]);
    assert_eq!(
        seen(&bench, &ctx, 1),
        Vec::<String>::new(),
        "a new cache is empty"
    );
    assert_eq!(
        seen(&bench, &ctx, 2),
        ["run-1"],
        "the second build sees the first one's file"
    );

    bench.daemon.terminate();
    bench.daemon.launch(|_| {}).expect("restart");
    assert_eq!(
        seen(&bench, &ctx, 3),
        ["run-1", "run-2"],
        "the cache survives a restart"
    );

    let stats = cache_stats(&bench);
    assert_eq!(stats["cache_mounts"], 1, "{stats}");
    let bytes = stats["cache_mount_bytes"].as_u64().expect("bytes");
    assert!(bytes >= 3 * 4096, "three files on disk: {stats}");
    assert!(stats["total_bytes"].as_u64().expect("total") >= bytes);

    // A step that hits the cache sees nothing of the mount: nothing reruns.
    let again = bench.build_ok(&ctx, &["--build-arg", "N=3"]);
    assert_eq!(executed(&again), 0, "{again}");

    let output = bench.daemon.run_client(&[
        "cache",
        "prune",
        "--filter",
        "type=exec.cachemount",
        "--json",
    ]);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("report");
    assert_eq!(report["removed_cache_mounts"], 1, "{report}");
    assert_eq!(
        report["removed_actions"], 0,
        "only cache mounts go: {report}"
    );
    assert_eq!(cache_stats(&bench)["cache_mounts"], 0);
    assert_eq!(
        seen(&bench, &ctx, 4),
        Vec::<String>::new(),
        "a pruned cache starts empty"
    );
    assert!(
        executed(&bench.build_ok(&ctx, &["--build-arg", "N=2"])) == 0,
        "pruning cache mounts keeps cached steps"
    );
}

/// Two builds that differ only in their name, each writing its start and end time (the
/// host's uptime, which containers share) into one cache mount, sleeping in between.
fn turns(bench: &Bench, sharing: &str) -> Vec<(String, f64, f64)> {
    let contexts: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|name| {
            let dockerfile = format!(
                "FROM BASE\nRUN --mount=type=cache,id=turns-{sharing},target=/c,sharing={sharing} \
                 echo {name} $(cut -d' ' -f1 /proc/uptime) >> /c/log && sleep 3 \
                 && echo {name} $(cut -d' ' -f1 /proc/uptime) >> /c/log\n"
            );
            bench.context(&format!("{sharing}-{name}"), &[("Dockerfile", &dockerfile)])
        })
        .collect();
    let started = Instant::now();
    let builds: Vec<_> = contexts
        .iter()
        .map(|ctx| {
            let mut command = bench.daemon.client();
            command.args(["build", "--progress", "plain"]).arg(ctx);
            command
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("client")
        })
        .collect();
    for build in builds {
        let output = build.wait_with_output().expect("build");
        assert!(
            output.status.success(),
            "{:?}\n{}",
            texts(&output),
            tail(&bench.daemon.log_text())
        );
    }
    assert!(started.elapsed() >= Duration::from_secs(3));
    let reader = bench.context(
        &format!("{sharing}-read"),
        &[(
            "Dockerfile",
            &format!(
                "FROM BASE\nRUN --mount=type=cache,id=turns-{sharing},target=/c cp /c/log /log\n"
            ),
        )],
    );
    let root = build_local(bench, &reader, &format!("{sharing}-out"), &[]);
    let log = std::fs::read_to_string(root.join("log")).expect("log");
    let mut spans: Vec<(String, f64, f64)> = Vec::new();
    for line in log.lines() {
        let (name, time) = line.split_once(' ').expect("name time");
        let time: f64 = time.parse().expect("seconds");
        match spans.iter_mut().find(|(n, _, _)| n == name) {
            Some(span) => span.2 = time,
            None => spans.push((name.to_owned(), time, 0.0)),
        }
    }
    spans.sort_by(|a, b| a.1.total_cmp(&b.1));
    assert_eq!(spans.len(), 2, "{log}");
    spans
}

#[test]
fn locked_cache_mounts_make_concurrent_builds_take_turns() {
    if !privileged("locked_cache_mounts_make_concurrent_builds_take_turns") {
        return;
    }
    let bench = Bench::start();
    // Shared: the two steps run at once (which shows the two builds do overlap here)...
    let shared = turns(&bench, "shared");
    assert!(
        shared[1].1 < shared[0].2,
        "shared steps overlap: {shared:?}"
    );
    // ...locked: the second starts only when the first let go.
    let locked = turns(&bench, "locked");
    assert!(
        locked[1].1 >= locked[0].2,
        "locked steps take turns: {locked:?}"
    );
}

#[test]
fn a_tmpfs_mount_is_a_fresh_tmpfs_and_stays_out_of_the_layer() {
    if !privileged("a_tmpfs_mount_is_a_fresh_tmpfs_and_stays_out_of_the_layer") {
        return;
    }
    let bench = Bench::start();
    let ctx = bench.context(
        "tmpfs",
        &[(
            "Dockerfile",
            "FROM BASE\nRUN --mount=type=tmpfs,target=/scratch/t,size=1m \
             grep ' /scratch/t tmpfs ' /proc/mounts > /mounts && echo x > /scratch/t/f \
             && ! dd if=/dev/zero of=/scratch/t/big bs=1M count=2 2>/dev/null\n",
        )],
    );
    let root = build_local(&bench, &ctx, "out", &[]);
    let mounts = std::fs::read_to_string(root.join("mounts")).expect("/mounts");
    assert!(mounts.contains("size=1024k"), "{mounts}");
    assert!(
        !root.join("scratch").exists(),
        "the mount point and its parent stay out"
    );
}

#[test]
fn an_unsupported_flag_fails_the_build_at_its_line_and_names_it() {
    let bench = Bench::start();
    let ctx = bench.context(
        "unsupported",
        &[(
            "Dockerfile",
            "FROM BASE\nRUN true\nRUN --security=insecure true\n",
        )],
    );
    let output = bench.build(&ctx, &[]);
    let (stdout, stderr) = texts(&output);
    assert!(!output.status.success(), "{stdout}");
    assert!(
        stderr.contains(":3:5: --security=insecure is not supported"),
        "{stderr}"
    );
}

const SECRETS: &str = "\
FROM BASE
RUN --mount=type=secret,id=token,mode=0440,uid=7 \\
    --mount=type=secret,id=api,env=API_KEY,target=/etc/api \\
    --mount=type=secret,id=unset \\
    sha256sum /run/secrets/token | cut -c1-64 > /file-hash \\
    && printf %s \"$API_KEY\" | sha256sum | cut -c1-64 > /env-hash \\
    && sha256sum /etc/api | cut -c1-64 > /api-file-hash \\
    && stat -c '%a %u' /run/secrets/token > /owner \\
    && test ! -e /run/secrets/unset
";

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every file under `dir` that holds `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                todo.push(entry.path());
            } else if kind.is_file()
                && std::fs::read(entry.path())
                    .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
            {
                found.push(entry.path());
            }
        }
    }
    found
}

#[test]
fn secrets_reach_run_as_files_and_variables_and_nothing_else() {
    if !privileged("secrets_reach_run_as_files_and_variables_and_nothing_else") {
        return;
    }
    let bench = Bench::start();
    let ctx = bench.context("secrets", &[("Dockerfile", SECRETS)]);
    let secret_file = bench.daemon.dir.path().join("token.txt");
    let build = |token: &str, api: &str, extra: &[&str]| {
        std::fs::write(&secret_file, token).expect("secret file");
        let file = format!("id=token,src={}", secret_file.display());
        let out = bench
            .daemon
            .dir
            .path()
            .join(format!("secrets-out-{}", extra.len()));
        let _ = std::fs::remove_dir_all(&out);
        let dest = format!("type=local,dest={}", out.display());
        let mut command = bench.daemon.client();
        command
            .args(["build", "--progress", "plain", "-o", &dest])
            .args(["--secret", &file, "--secret", "id=api,env=MB_TEST_API"])
            .args(extra)
            .arg(&ctx)
            .env("MB_TEST_API", api);
        let output = command.output().expect("client");
        let (stdout, stderr) = texts(&output);
        assert!(
            output.status.success(),
            "{stderr}\n{}",
            tail(&bench.daemon.log_text())
        );
        (out, format!("{stdout}{stderr}"))
    };
    let (root, progress) = build("token-value-0d1e2f", "api-value-9a8b7c", &[]);
    let read = |name: &str| std::fs::read_to_string(root.join(name)).expect(name);
    assert_eq!(read("file-hash").trim(), sha256_hex(b"token-value-0d1e2f"));
    assert_eq!(read("env-hash").trim(), sha256_hex(b"api-value-9a8b7c"));
    assert_eq!(
        read("api-file-hash").trim(),
        sha256_hex(b"api-value-9a8b7c")
    );
    assert_eq!(read("owner").trim(), "440 7");
    assert!(!root.join("run/secrets").exists() && !root.join("etc/api").exists());

    // Nowhere on disk: not in a layer, the config, an index, a log; nor in the progress.
    for secret in [&b"token-value-0d1e2f"[..], b"api-value-9a8b7c"] {
        assert_eq!(
            files_holding(&bench.daemon.root, secret),
            Vec::<PathBuf>::new()
        );
        assert_eq!(files_holding(&root, secret), Vec::<PathBuf>::new());
        assert!(
            !progress
                .as_bytes()
                .windows(secret.len())
                .any(|w| w == secret)
        );
    }

    // A changed secret reruns nothing (it is in no key); --no-cache reruns with it.
    let (root, progress) = build("token-value-changed", "api-value-changed", &[]);
    assert!(progress.contains("CACHED"), "{progress}");
    assert_eq!(
        std::fs::read_to_string(root.join("file-hash"))
            .expect("hash")
            .trim(),
        sha256_hex(b"token-value-0d1e2f")
    );
    let (root, _) = build("token-value-changed", "api-value-changed", &["--no-cache"]);
    assert_eq!(
        std::fs::read_to_string(root.join("file-hash"))
            .expect("hash")
            .trim(),
        sha256_hex(b"token-value-changed")
    );

    let required = bench.context(
        "required",
        &[(
            "Dockerfile",
            "FROM BASE\nRUN --mount=type=secret,id=npmrc,required true\n",
        )],
    );
    let output = bench.build(&required, &[]);
    let (_, stderr) = texts(&output);
    assert!(!output.status.success());
    assert!(
        stderr.contains("secret \\\"npmrc\\\" is required but the build was given none")
            || stderr.contains("secret \"npmrc\" is required but the build was given none"),
        "{stderr}"
    );
}

/// `ssh-add` and the libraries it loads, at their own paths, to COPY into the busybox image.
fn ssh_add_rootfs(ctx: &Path) {
    let ldd = std::process::Command::new("ldd")
        .arg("/usr/bin/ssh-add")
        .output()
        .expect("ldd");
    let mut files = vec![PathBuf::from("/usr/bin/ssh-add")];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|word| word.starts_with('/'))
            .map(PathBuf::from);
        files.extend(path);
    }
    for file in files {
        let dest = ctx
            .join("rootfs")
            .join(file.strip_prefix("/").expect("absolute"));
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&file, &dest).expect("copy");
    }
}

/// Kills the agent the test started.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_ssh_mount_reaches_the_agent_the_caller_forwards() {
    if !privileged("an_ssh_mount_reaches_the_agent_the_caller_forwards") {
        return;
    }
    let bench = Bench::start();
    let dir = bench.daemon.dir.path();
    let socket = dir.join("agent.sock");
    let _agent = Agent(
        std::process::Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("ssh-agent (openssh-client)"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "ssh-agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let key = dir.join("id_ed25519");
    let run = |program: &str, args: &[std::ffi::OsString]| {
        let output = std::process::Command::new(program)
            .args(args)
            .env("SSH_AUTH_SOCK", &socket)
            .output()
            .expect(program);
        assert!(output.status.success(), "{program}: {:?}", texts(&output));
        texts(&output).0
    };
    let mut keygen: Vec<std::ffi::OsString> =
        ["-q", "-t", "ed25519", "-N", "", "-C", "mb-test", "-f"]
            .map(Into::into)
            .to_vec();
    keygen.push(key.clone().into());
    run("ssh-keygen", &keygen);
    run("ssh-add", &[key.clone().into()]);
    let listed = run("ssh-add", &["-l".into()]);
    assert!(listed.contains("mb-test"), "{listed}");

    let ctx = bench.context(
        "ssh",
        &[(
            "Dockerfile",
            "FROM BASE\nCOPY rootfs/ /\nRUN --mount=type=ssh ssh-add -l > /keys && echo $SSH_AUTH_SOCK > /sock\n",
        )],
    );
    ssh_add_rootfs(&ctx);
    let out = dir.join("ssh-out");
    let dest = format!("type=local,dest={}", out.display());
    let output = bench
        .daemon
        .client()
        .args([
            "build",
            "--progress",
            "plain",
            "--ssh",
            "default",
            "-o",
            &dest,
        ])
        .arg(&ctx)
        .env("SSH_AUTH_SOCK", &socket)
        .output()
        .expect("client");
    let (_, stderr) = texts(&output);
    assert!(
        output.status.success(),
        "{stderr}\n{}",
        tail(&bench.daemon.log_text())
    );
    let keys = std::fs::read_to_string(out.join("keys")).expect("/keys");
    assert_eq!(keys, listed, "the step lists the caller's agent's keys");
    assert_eq!(
        std::fs::read_to_string(out.join("sock"))
            .expect("/sock")
            .trim(),
        "/run/buildkit/ssh_agent.0"
    );
    assert!(
        !out.join("run/buildkit").exists(),
        "the socket's mount point stays out"
    );

    // Without --ssh, a required agent is a clear error.
    let required = bench.context(
        "ssh-required",
        &[(
            "Dockerfile",
            "FROM BASE\nRUN --mount=type=ssh,required=true true\n",
        )],
    );
    let output = bench.build(&required, &[]);
    let (_, stderr) = texts(&output);
    assert!(!output.status.success());
    assert!(
        stderr.contains("is required but the build was given none"),
        "{stderr}"
    );
}

const BIND: &str = "\
FROM BASE AS builder
RUN mkdir /out && echo built > /out/artifact

FROM BASE
RUN --mount=type=bind,source=src,target=/src \\
    --mount=from=builder,source=/out,target=/in,rw \\
    cat /src/a.txt /in/artifact > /result && echo scribble > /in/new && ! touch /src/x
";

#[test]
fn bind_mounts_read_the_context_and_stages_key_on_what_they_read_and_keep_no_writes() {
    if !privileged(
        "bind_mounts_read_the_context_and_stages_key_on_what_they_read_and_keep_no_writes",
    ) {
        return;
    }
    let bench = Bench::start();
    let ctx = bench.context(
        "bind",
        &[
            ("Dockerfile", BIND),
            ("src/a.txt", "a\n"),
            ("other.txt", "unrelated\n"),
        ],
    );
    let root = build_local(&bench, &ctx, "bind-1", &[]);
    assert_eq!(
        std::fs::read_to_string(root.join("result")).expect("/result"),
        "a\nbuilt\n"
    );
    assert!(!root.join("src").exists() && !root.join("in").exists());

    std::fs::write(ctx.join("other.txt"), "changed\n").expect("edit");
    assert_eq!(
        executed(&bench.build_ok(&ctx, &[])),
        0,
        "a file no mount reads"
    );
    std::fs::write(ctx.join("src/a.txt"), "a2\n").expect("edit");
    let root = build_local(&bench, &ctx, "bind-2", &[]);
    assert_eq!(
        std::fs::read_to_string(root.join("result")).expect("/result"),
        "a2\nbuilt\n",
        "a file the bind mount reads reruns the step"
    );

    // The rw mount's writes went nowhere: the stage it read is as it was.
    let builder = build_local(&bench, &ctx, "bind-builder", &["--target", "builder"]);
    assert!(builder.join("out/artifact").is_file());
    assert!(!builder.join("out/new").exists());
}
