//! The Dockerfile frontend through the client: graph, target pruning, parse dumps, errors.

use std::collections::{BTreeMap, BTreeSet};

use memobuild_tests::{TestDaemon, texts};

const THREE_STAGES: &str = "\
FROM alpine:3.20 AS deps
WORKDIR /app
COPY package.json ./
RUN npm ci

FROM golang:1.22 AS tools
RUN go install example.com/tool@latest

FROM deps AS final
COPY --from=tools /go/bin/tool /usr/local/bin/
COPY src/ ./src/
CMD [\"node\", \"src/index.js\"]
";

fn graph_json(daemon: &TestDaemon, extra: &[&str]) -> serde_json::Value {
    let ctx = daemon.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("Dockerfile"), THREE_STAGES).expect("Dockerfile");
    let mut args = vec!["graph", ctx.to_str().expect("utf-8"), "--format", "json"];
    args.extend_from_slice(extra);
    let output = daemon.run_client(&args);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stderr}");
    serde_json::from_str(&stdout).expect("graph JSON")
}

/// Every node reachable from `start` along edges.
fn reachable(edges: &BTreeMap<u64, Vec<u64>>, start: u64) -> BTreeSet<u64> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![start];
    while let Some(node) = stack.pop() {
        if seen.insert(node) {
            stack.extend(edges.get(&node).into_iter().flatten());
        }
    }
    seen
}

fn stage_nodes(graph: &serde_json::Value, stage: u64) -> Vec<u64> {
    graph["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["stage"].as_u64() == Some(stage))
        .map(|n| n["id"].as_u64().expect("id"))
        .collect()
}

#[test]
fn independent_stages_are_separate_branches() {
    let daemon = TestDaemon::start();
    let graph = graph_json(&daemon, &[]);
    let stages: Vec<&str> = graph["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| s["name"].as_str().expect("named"))
        .collect();
    assert_eq!(stages, ["deps", "tools", "final"]);
    let mut edges: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for edge in graph["edges"].as_array().expect("edges") {
        let from = edge[0].as_u64().expect("from");
        edges
            .entry(from)
            .or_default()
            .push(edge[1].as_u64().expect("to"));
    }
    let deps = stage_nodes(&graph, 0);
    let tools = stage_nodes(&graph, 1);
    for &d in &deps {
        for &t in &tools {
            assert!(
                !reachable(&edges, d).contains(&t),
                "deps #{d} reaches tools #{t}"
            );
            assert!(
                !reachable(&edges, t).contains(&d),
                "tools #{t} reaches deps #{d}"
            );
        }
    }
    // Both branches join in the final stage.
    let final_stage = stage_nodes(&graph, 2);
    let joins = |from: &[u64]| {
        from.iter()
            .any(|&n| reachable(&edges, n).iter().any(|r| final_stage.contains(r)))
    };
    assert!(joins(&deps) && joins(&tools));
}

#[test]
fn target_keeps_only_the_stages_it_needs() {
    let daemon = TestDaemon::start();
    let graph = graph_json(&daemon, &["--target", "tools"]);
    let stages: Vec<&str> = graph["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| s["name"].as_str().expect("named"))
        .collect();
    assert_eq!(stages, ["tools"]);
    let labels: Vec<&str> = graph["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["label"].as_str().expect("label"))
        .collect();
    assert!(!labels.iter().any(|l| l.contains("npm")), "{labels:?}");
}

#[test]
fn dump_matches_buildkits_format_and_errors_point_at_the_line() {
    let daemon = TestDaemon::start();
    let dockerfile = daemon.dir.path().join("Dockerfile");
    std::fs::write(&dockerfile, "FROM busybox\nENV a=1 b=2\nCMD [\"sh\"]\n").expect("write");
    let output = daemon.run_client(&[
        "debug",
        "dump-dockerfile",
        dockerfile.to_str().expect("utf-8"),
    ]);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(
        stdout,
        "(from \"busybox\")\n(env \"a\" \"1\" \"=\" \"b\" \"2\" \"=\")\n(cmd \"sh\")\n"
    );

    std::fs::write(&dockerfile, "FROM busybox\nRUN --bogus=1 true\n").expect("write");
    let ctx = daemon.dir.path().to_str().expect("utf-8").to_owned();
    let output = daemon.run_client(&["graph", &ctx]);
    let (_, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let location = format!("{}:2:5: unknown flag: --bogus", dockerfile.display());
    assert!(stderr.contains(&location), "{stderr}");
    assert!(stderr.contains("RUN --bogus=1 true\n    ^"), "{stderr}");
}
