//! buildx's build flags for scripts: `--iidfile`, `--metadata-file`, `-q`, `--platform`.

use memobuild_tests::bench::{Bench, tail};
use memobuild_tests::{privileged, texts};

#[test]
fn iidfile_metadata_file_and_quiet_name_the_built_image() {
    if !privileged("iidfile_metadata_file_and_quiet_name_the_built_image") {
        return;
    }
    let bench = Bench::start();
    let ctx = bench.context("flags", &[("Dockerfile", "FROM BASE\nRUN echo hi > /hi\n")]);
    let dir = bench.daemon.dir.path();
    let (iidfile, metadata) = (dir.join("iid"), dir.join("metadata.json"));
    let output = bench
        .daemon
        .client()
        .args(["build", "-q", "-t", "flags:1", "--platform", "local"])
        .arg("--iidfile")
        .arg(&iidfile)
        .arg("--metadata-file")
        .arg(&metadata)
        .arg(&ctx)
        .output()
        .expect("client");
    let (stdout, stderr) = texts(&output);
    assert!(
        output.status.success(),
        "{stderr}\n{}",
        tail(&bench.daemon.log_text())
    );
    assert!(stderr.is_empty(), "-q prints no progress: {stderr}");
    let id = std::fs::read_to_string(&iidfile).expect("iidfile");
    assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
    assert_eq!(stdout.trim(), id, "-q prints the image id");
    let metadata: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metadata).expect("metadata")).expect("json");
    assert_eq!(metadata["containerimage.config.digest"], id.as_str());
    assert_eq!(metadata["image.name"], "flags:1");
    let images = bench.daemon.run_client(&["images", "--json"]);
    let images: serde_json::Value = serde_json::from_str(&texts(&images).0).expect("images json");
    let stored = images
        .as_array()
        .expect("images")
        .iter()
        .find(|i| i["name"].as_str().is_some_and(|n| n.contains("flags:1")))
        .expect("the tagged image");
    assert_eq!(metadata["containerimage.digest"], stored["digest"]);

    let other = bench.build(&ctx, &["--platform", "linux/s390x"]);
    let (_, stderr) = texts(&other);
    assert!(!other.status.success());
    assert!(
        stderr.contains("linux/s390x: only the host platform"),
        "{stderr}"
    );
}
