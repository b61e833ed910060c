//! Images other tools agree on: pushed images checked with skopeo and umoci, pushes that
//! upload nothing twice, credentials, reproducible digests, the image store.

use std::path::Path;
use std::process::{Command, Output};

use memobuild_tests::bench::{dir_listing, tar_listing};
use memobuild_tests::registry::TestRegistry;
use memobuild_tests::{TestDaemon, privileged, texts};

fn run(daemon: &TestDaemon, args: &[&str]) -> Output {
    daemon.run_client(args)
}

fn ok(daemon: &TestDaemon, args: &[&str]) -> String {
    let output = run(daemon, args);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{args:?}: {stderr}");
    stdout
}

fn context(daemon: &TestDaemon, name: &str, dockerfile: &str) -> String {
    let ctx = daemon.dir.path().join(name);
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("Dockerfile"), dockerfile).expect("Dockerfile");
    std::fs::write(ctx.join("app.txt"), format!("app {name}")).expect("file");
    ctx.to_str().expect("utf-8").to_owned()
}

fn image_digest(daemon: &TestDaemon, name: &str) -> String {
    let images: serde_json::Value =
        serde_json::from_str(&ok(daemon, &["images", "--json"])).expect("json");
    images
        .as_array()
        .expect("list")
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {images}"))["digest"]
        .as_str()
        .expect("digest")
        .to_owned()
}

fn push(daemon: &TestDaemon, name: &str) -> serde_json::Value {
    serde_json::from_str(&ok(daemon, &["push", name, "--json"])).expect("push JSON")
}

/// The manifest digest of the build's `-o type=oci` output.
fn oci_export_digest(daemon: &TestDaemon, ctx: &str) -> String {
    let archive = daemon.dir.path().join("export.oci.tar");
    let dest = format!("type=oci,dest={}", archive.display());
    ok(daemon, &["build", ctx, "--progress", "quiet", "-o", &dest]);
    let index = Command::new("tar")
        .arg("-xOf")
        .arg(&archive)
        .arg("index.json")
        .output()
        .expect("tar");
    let index: serde_json::Value = serde_json::from_slice(&index.stdout).expect("index.json");
    index["manifests"][0]["digest"]
        .as_str()
        .expect("a manifest digest")
        .to_owned()
}

#[test]
fn a_pushed_image_is_what_skopeo_and_umoci_see_and_a_second_push_uploads_nothing() {
    if !privileged("a_pushed_image_is_what_skopeo_and_umoci_see_and_a_second_push_uploads_nothing")
    {
        return;
    }
    let registry = TestRegistry::start();
    registry.seed_busybox("busybox");
    let daemon = TestDaemon::start();
    let reg = registry.address();
    let dockerfile =
        format!("FROM {reg}/busybox\nCOPY app.txt /app/\nRUN echo built > /app/built\n");
    let ctx = context(&daemon, "app", &dockerfile);
    let name = format!("{reg}/app:1");
    let rootfs = daemon.dir.path().join("rootfs.tar");
    let dest = format!("type=tar,dest={}", rootfs.display());
    ok(
        &daemon,
        &["build", &ctx, "-t", &name, "--progress", "quiet"],
    );
    ok(
        &daemon,
        &["build", &ctx, "--progress", "quiet", "-o", &dest],
    );
    // The store keeps layers uncompressed; a gzip OCI export and a (gzip) push compress
    // them the same way, so the registry gets the manifest the export holds.
    let digest = oci_export_digest(&daemon, &ctx);

    let first = push(&daemon, &name);
    assert_eq!(first["digest"], digest.as_str());
    assert_eq!(registry.inspect_digest("app:1").to_string(), digest);
    // COPY layer, RUN layer, config; the base layer came from busybox on the same
    // registry, so it is mounted, not uploaded.
    assert_eq!(first["blobs_uploaded"], 3, "{first}");
    assert_eq!(first["blobs_skipped"], 1, "{first}");

    let uploads = registry.blob_uploads("app");
    let second = push(&daemon, &name);
    assert_eq!(second["blobs_uploaded"], 0, "{second}");
    assert_eq!(
        registry.blob_uploads("app"),
        uploads,
        "the registry saw no upload"
    );

    // Another image on the same base uploads only its own layers.
    let other = context(
        &daemon,
        "other",
        &format!("FROM {reg}/busybox\nRUN echo other > /other\n"),
    );
    let other_name = format!("{reg}/other:1");
    ok(
        &daemon,
        &["build", &other, "-t", &other_name, "--progress", "quiet"],
    );
    let third = push(&daemon, &other_name);
    assert_eq!(
        third["blobs_uploaded"], 2,
        "its RUN layer and its config: {third}"
    );

    // skopeo copies it out, umoci unpacks it: the same root filesystem as our own output.
    let layout = daemon.dir.path().join("layout");
    let copy = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{name}"))
        .arg(format!("oci:{}:app", layout.display()))
        .output()
        .expect("skopeo");
    assert!(copy.status.success(), "{:?}", texts(&copy));
    let bundle = daemon.dir.path().join("bundle");
    let unpack = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:app", layout.display()))
        .arg(&bundle)
        .output()
        .expect("umoci");
    assert!(unpack.status.success(), "{:?}", texts(&unpack));
    assert_eq!(dir_listing(&bundle.join("rootfs")), tar_listing(&rootfs));
}

#[test]
fn pushes_use_docker_config_credentials_and_say_clearly_when_they_are_missing() {
    if !privileged("pushes_use_docker_config_credentials_and_say_clearly_when_they_are_missing") {
        return;
    }
    let private = TestRegistry::start_with_htpasswd("builder", "s3cret");
    let docker_config = tempfile::tempdir().expect("config dir");
    let daemon = TestDaemon::start_with(|cmd| {
        cmd.env("DOCKER_CONFIG", docker_config.path());
    });
    let ctx = context(&daemon, "private", "FROM scratch\nCOPY app.txt /\n");
    let name = format!("{}/private:1", private.address());
    ok(
        &daemon,
        &["build", &ctx, "-t", &name, "--progress", "quiet"],
    );

    let refused = run(&daemon, &["push", &name]);
    let (_, stderr) = texts(&refused);
    assert_eq!(refused.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.to_lowercase().contains("unauthorized") || stderr.contains("credentials"),
        "{stderr}"
    );
    // `build --push` fails the same way: a permission error, not an internal one.
    let refused = run(
        &daemon,
        &["build", &ctx, "-t", &name, "--push", "--progress", "quiet"],
    );
    let (_, stderr) = texts(&refused);
    assert_eq!(refused.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains(&format!("pushing {name}")), "{stderr}");
    // And a push with nowhere to go is refused before anything is built.
    let nameless = run(&daemon, &["build", &ctx, "--push", "--progress", "plain"]);
    let (_, stderr) = texts(&nameless);
    assert_eq!(nameless.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--push needs a name"), "{stderr}");
    assert!(!stderr.contains("COPY"), "nothing was built: {stderr}");

    let auth = base64("builder:s3cret");
    std::fs::write(
        docker_config.path().join("config.json"),
        format!(
            "{{\"auths\": {{\"{}\": {{\"auth\": \"{auth}\"}}}}}}",
            private.address()
        ),
    )
    .expect("config.json");
    // Without --json, every blob's progress is shown as it happens.
    let pushed = run(&daemon, &["push", &name]);
    let (stdout, stderr) = texts(&pushed);
    assert!(pushed.status.success(), "{stderr}");
    assert_eq!(stderr.matches(": pushed ").count(), 2, "{stderr}");
    assert!(stdout.contains("2 blob(s) uploaded"), "{stdout}");
}

fn base64(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = text.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn two_fresh_roots_build_identical_images_with_source_date_epoch() {
    if !privileged("two_fresh_roots_build_identical_images_with_source_date_epoch") {
        return;
    }
    let registry = TestRegistry::start();
    registry.seed_busybox("busybox");
    let dockerfile = format!(
        "FROM {}/busybox\nCOPY app.txt /app/\nRUN echo made > /app/made && mkdir -p /app/dir\nCMD [\"cat\", \"/app/made\"]\n",
        registry.address()
    );
    let digests: Vec<String> = (0..2)
        .map(|_| {
            let daemon = TestDaemon::start();
            let ctx = context(&daemon, "repro", &dockerfile);
            ok(
                &daemon,
                &[
                    "build",
                    &ctx,
                    "-t",
                    "repro",
                    "--progress",
                    "quiet",
                    "--source-date-epoch",
                    "0",
                ],
            );
            image_digest(&daemon, "repro:latest")
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
}

#[test]
fn tags_survive_a_restart_and_rmi_removes_them() {
    if !privileged("tags_survive_a_restart_and_rmi_removes_them") {
        return;
    }
    let mut daemon = TestDaemon::start();
    let ctx = context(&daemon, "tags", "FROM scratch\nCOPY app.txt /\n");
    ok(
        &daemon,
        &[
            "build",
            &ctx,
            "-t",
            "one",
            "-t",
            "two:v2",
            "--progress",
            "quiet",
        ],
    );
    daemon.terminate();
    daemon.launch(|_| {}).expect("restart");
    let listed = ok(&daemon, &["images"]);
    assert!(
        listed.contains("one:latest") && listed.contains("two:v2"),
        "{listed}"
    );
    ok(&daemon, &["rmi", "one"]);
    let listed = ok(&daemon, &["images"]);
    assert!(
        !listed.contains("one:latest") && listed.contains("two:v2"),
        "{listed}"
    );
    let missing = run(&daemon, &["rmi", "one"]);
    assert_eq!(missing.status.code(), Some(1));
}

#[test]
fn a_docker_archive_is_read_by_skopeo_with_docker_media_types() {
    let daemon = TestDaemon::start();
    let ctx = context(
        &daemon,
        "docker",
        "FROM scratch\nCOPY app.txt /\nCMD [\"/app.txt\"]\n",
    );
    let archive = daemon.dir.path().join("image.docker.tar");
    let dest = format!("type=docker,dest={}", archive.display());
    ok(
        &daemon,
        &[
            "build",
            &ctx,
            "-t",
            "arch:1",
            "--progress",
            "quiet",
            "-o",
            &dest,
        ],
    );
    let inspect = Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("docker-archive:{}", archive.display()))
        .output()
        .expect("skopeo is installed by .ci/install-deps");
    let (stdout, stderr) = texts(&inspect);
    assert!(inspect.status.success(), "{stderr}");
    assert!(
        stdout.contains("application/vnd.docker.distribution.manifest.v2+json")
            || stdout.contains("application/vnd.docker.container.image.v1+json"),
        "{stdout}"
    );
    let config = Command::new("skopeo")
        .args(["inspect", "--config"])
        .arg(format!("docker-archive:{}", archive.display()))
        .output()
        .expect("skopeo");
    let (config, _) = texts(&config);
    assert!(config.contains("/app.txt"), "{config}");
}

#[test]
fn a_tar_streams_to_stdout_with_special_files_kept() {
    let daemon = TestDaemon::start();
    let ctx = context(&daemon, "stdout", "FROM scratch\nCOPY app.txt pipe /x/\n");
    let fifo = Command::new("mkfifo")
        .arg(Path::new(&ctx).join("pipe"))
        .status()
        .expect("mkfifo");
    assert!(fifo.success());
    let output = run(&daemon, &["build", &ctx, "--progress", "quiet", "-o", "-"]);
    assert!(output.status.success(), "{:?}", texts(&output));
    let mut archive = tar::Archive::new(output.stdout.as_slice());
    let mut kinds: Vec<(String, tar::EntryType)> = archive
        .entries()
        .expect("a tar on stdout")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.path().expect("path").display().to_string(),
                e.header().entry_type(),
            )
        })
        .collect();
    kinds.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        kinds,
        [
            ("x/".to_owned(), tar::EntryType::Directory),
            ("x/app.txt".to_owned(), tar::EntryType::Regular),
            ("x/pipe".to_owned(), tar::EntryType::Fifo),
        ]
    );
}

#[test]
fn docker_loads_and_runs_a_docker_archive() {
    let test = "docker_loads_and_runs_a_docker_archive";
    if !privileged(test) {
        return;
    }
    let docker = match memobuild_tests::docker::TestDocker::start() {
        Ok(docker) => docker,
        Err(reason) => {
            assert!(
                std::env::var_os(memobuild_tests::REQUIRE_PRIVILEGED_ENV).is_none(),
                "{test}: no Docker daemon, and CI must not skip: {reason}"
            );
            eprintln!("SKIPPED {test}: {reason}");
            return;
        }
    };
    let daemon = TestDaemon::start();
    let ctx = context(
        &daemon,
        "docker-run",
        "FROM scratch\nCOPY busybox /bin/busybox\nCMD [\"/bin/busybox\", \"cat\", \"/app.txt\"]\nCOPY app.txt /\n",
    );
    std::fs::copy("/bin/busybox", Path::new(&ctx).join("busybox")).expect("busybox-static");
    let archive = daemon.dir.path().join("loadme.tar");
    let dest = format!("type=docker,dest={}", archive.display());
    ok(
        &daemon,
        &[
            "build",
            &ctx,
            "-t",
            "memobuild-e2e:loaded",
            "--progress",
            "quiet",
            "-o",
            &dest,
        ],
    );

    let load = docker.run(&["load", "-i", archive.to_str().expect("utf-8")]);
    assert!(
        load.status.success(),
        "{:?}\n{}",
        texts(&load),
        docker.log()
    );
    let ran = docker.run(&["run", "--rm", "--network=none", "memobuild-e2e:loaded"]);
    let (stdout, stderr) = texts(&ran);
    assert!(ran.status.success(), "{stderr}\n{}", docker.log());
    assert_eq!(stdout, "app docker-run");
}
