//! Lazily compressed layers as other tools see them: gzip exports are reproducible, zstd
//! outputs and pushes carry buildx's media type and unpack to the same root filesystem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use memobuild_tests::bench::dir_listing;
use memobuild_tests::registry::TestRegistry;
use memobuild_tests::{TestDaemon, privileged, texts};

const ZSTD_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn context(daemon: &TestDaemon, dockerfile: &str) -> PathBuf {
    let ctx = daemon.dir.path().join("ctx");
    std::fs::create_dir_all(ctx.join("src")).expect("ctx");
    std::fs::write(ctx.join("Dockerfile"), dockerfile).expect("Dockerfile");
    for i in 0..50 {
        std::fs::write(
            ctx.join(format!("src/f{i}.txt")),
            format!("file {i}\n").repeat(i + 1),
        )
        .expect("file");
    }
    ctx
}

fn build(daemon: &TestDaemon, ctx: &Path, output: &str) {
    let ctx = ctx.to_str().expect("utf-8");
    let out = daemon.run_client(&["build", ctx, "--progress", "quiet", "-o", output]);
    assert!(out.status.success(), "-o {output}: {:?}", texts(&out));
}

/// Exports the image as an OCI archive and unpacks the archive into a layout directory.
fn oci_layout(daemon: &TestDaemon, ctx: &Path, name: &str, options: &str) -> PathBuf {
    let archive = daemon.dir.path().join(format!("{name}.tar"));
    build(
        daemon,
        ctx,
        &format!("type=oci,dest={}{options}", archive.display()),
    );
    let layout = daemon.dir.path().join(name);
    std::fs::create_dir_all(&layout).expect("layout dir");
    let untar = Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout)
        .output()
        .expect("tar");
    assert!(untar.status.success(), "{:?}", texts(&untar));
    layout
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("read JSON")).expect("JSON")
}

/// The manifest an OCI layout's index names.
fn manifest(layout: &Path) -> (String, serde_json::Value) {
    let index = json(&layout.join("index.json"));
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .expect("manifest digest")
        .to_owned();
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    (digest.clone(), json(&layout.join("blobs/sha256").join(hex)))
}

fn layer_media_types(manifest: &serde_json::Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|layer| layer["mediaType"].as_str().expect("media type").to_owned())
        .collect()
}

fn umoci_rootfs(layout: &Path, bundle: &Path) -> BTreeMap<String, String> {
    let tag = json(&layout.join("index.json"))["manifests"][0]["annotations"]
        ["org.opencontainers.image.ref.name"]
        .as_str()
        .unwrap_or("latest")
        .to_owned();
    if tag == "latest" && !has_ref(layout) {
        name_the_manifest(layout, &tag);
    }
    let layout = gzip_for_umoci(layout, &tag);
    let unpack = Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:{tag}", layout.display()))
        .arg(bundle)
        .output()
        .expect("umoci is installed by .ci/install-deps");
    assert!(unpack.status.success(), "{:?}", texts(&unpack));
    dir_listing(&bundle.join("rootfs"))
}

/// Debian's umoci (0.4.7) reads no zstd layers: skopeo, which does, decompresses them
/// (checking every digest) and writes gzip into a second layout for umoci.
fn gzip_for_umoci(layout: &Path, tag: &str) -> PathBuf {
    if !layer_media_types(&manifest(layout).1)
        .iter()
        .any(|t| t == ZSTD_LAYER)
    {
        return layout.to_path_buf();
    }
    let converted = layout.with_extension("gzip");
    let copy = Command::new("skopeo")
        .args(["copy", "--dest-compress-format", "gzip"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("oci:{}:{tag}", converted.display()))
        .output()
        .expect("skopeo is installed by .ci/install-deps");
    assert!(copy.status.success(), "{:?}", texts(&copy));
    converted
}

fn has_ref(layout: &Path) -> bool {
    json(&layout.join("index.json"))["manifests"][0]["annotations"]
        ["org.opencontainers.image.ref.name"]
        .is_string()
}

/// umoci unpacks by reference name; an untagged export gets one.
fn name_the_manifest(layout: &Path, tag: &str) {
    let mut index = json(&layout.join("index.json"));
    index["manifests"][0]["annotations"] =
        serde_json::json!({ "org.opencontainers.image.ref.name": tag });
    std::fs::write(layout.join("index.json"), index.to_string()).expect("index.json");
}

#[test]
fn gzip_exports_repeat_their_digests_and_zstd_unpacks_to_the_same_rootfs() {
    let daemon = TestDaemon::start();
    let ctx = context(
        &daemon,
        "FROM scratch\nCOPY src /src\nCOPY Dockerfile /etc/Dockerfile\n",
    );
    let first = oci_layout(&daemon, &ctx, "gzip-1", "");
    let second = oci_layout(&daemon, &ctx, "gzip-2", ",compression=gzip");
    let (gzip_digest, gzip) = manifest(&first);
    assert_eq!(
        manifest(&second).0,
        gzip_digest,
        "the same build exported twice with gzip"
    );
    assert!(
        layer_media_types(&gzip).iter().all(|t| t == GZIP_LAYER),
        "{gzip}"
    );

    let zstd = oci_layout(
        &daemon,
        &ctx,
        "zstd",
        ",compression=zstd,compression-level=5",
    );
    let (zstd_digest, zstd_manifest) = manifest(&zstd);
    assert_ne!(zstd_digest, gzip_digest);
    assert!(
        layer_media_types(&zstd_manifest)
            .iter()
            .all(|t| t == ZSTD_LAYER),
        "{zstd_manifest}"
    );
    assert_eq!(
        zstd_manifest["config"]["digest"], gzip["config"]["digest"],
        "the config names diff-ids, which compression does not change"
    );
    let again = oci_layout(
        &daemon,
        &ctx,
        "zstd-again",
        ",compression=zstd,compression-level=5",
    );
    assert_eq!(
        manifest(&again).0,
        zstd_digest,
        "zstd forms are reproducible"
    );

    let inspect = Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci:{}", zstd.display()))
        .output()
        .expect("skopeo is installed by .ci/install-deps");
    let (raw, stderr) = texts(&inspect);
    assert!(inspect.status.success(), "{stderr}");
    assert!(raw.contains(ZSTD_LAYER), "{raw}");

    let scratch = daemon.dir.path().join("bundles");
    let from_gzip = umoci_rootfs(&first, &scratch.join("gzip"));
    let from_zstd = umoci_rootfs(&zstd, &scratch.join("zstd"));
    assert!(from_gzip.len() > 50, "{from_gzip:?}");
    assert_eq!(from_zstd, from_gzip);
}

#[test]
fn a_zstd_image_pushed_to_a_registry_is_pulled_back_and_verified_by_skopeo() {
    if !privileged("a_zstd_image_pushed_to_a_registry_is_pulled_back_and_verified_by_skopeo") {
        return;
    }
    let registry = TestRegistry::start();
    registry.seed_busybox("busybox");
    let daemon = TestDaemon::start();
    let reg = registry.address();
    let ctx = context(
        &daemon,
        &format!("FROM {reg}/busybox\nCOPY src /src\nRUN cat /src/f3.txt > /copied\n"),
    );
    // As buildx: the base image's gzip layer stays gzip unless compression is forced.
    for (tag, force, base_is_zstd) in [("kept", "false", false), ("forced", "true", true)] {
        let name = format!("{reg}/zstd:{tag}");
        build(
            &daemon,
            &ctx,
            &format!("type=image,name={name},push=true,compression=zstd,force-compression={force}"),
        );
        let raw = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{name}"))
            .output()
            .expect("skopeo is installed by .ci/install-deps");
        let (raw, stderr) = texts(&raw);
        let manifest: serde_json::Value =
            serde_json::from_str(&raw).unwrap_or_else(|_| panic!("{raw} {stderr}"));
        let types = layer_media_types(&manifest);
        assert_eq!(types.len(), 3, "busybox, COPY, RUN: {manifest}");
        assert_eq!(types[0] == ZSTD_LAYER, base_is_zstd, "{manifest}");
        assert!(types[1..].iter().all(|t| t == ZSTD_LAYER), "{manifest}");

        // skopeo checks every blob against its digest while copying.
        let layout = daemon.dir.path().join(format!("pulled-{tag}"));
        let copy = Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{name}"))
            .arg(format!("oci:{}:{tag}", layout.display()))
            .output()
            .expect("skopeo");
        assert!(copy.status.success(), "{:?}", texts(&copy));
        let rootfs = umoci_rootfs(&layout, &daemon.dir.path().join(format!("bundle-{tag}")));
        assert!(
            rootfs.keys().any(|path| path.contains("copied")),
            "{rootfs:?}"
        );
    }
}
