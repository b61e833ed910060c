use petgraph::algo::{has_path_connecting, toposort};

use super::*;
use crate::frontend::{self, DiagnosticKind};

fn plan(
    text: &str,
    target: Option<&str>,
    build_args: &[(&str, &str)],
) -> Result<BuildGraph, PlanError> {
    let df = frontend::parse(text, "Dockerfile").expect("parses");
    let opts = PlanOptions {
        target: target.map(str::to_owned),
        build_args: build_args
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    };
    lower(&df, &opts)
}

fn graph(text: &str) -> BuildGraph {
    plan(text, None, &[]).expect("plans")
}

/// The node whose label starts with `prefix`.
fn find<'g>(g: &'g BuildGraph, prefix: &str) -> (NodeIndex, &'g Node) {
    g.nodes()
        .find(|(_, n)| n.label.starts_with(prefix))
        .map(|(i, n)| (NodeIndex::new(i as usize), n))
        .unwrap_or_else(|| panic!("no node labelled {prefix:?}"))
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn stage_error(text: &str, target: Option<&str>) -> frontend::Diagnostic {
    match plan(text, target, &[]) {
        Err(PlanError::Dockerfile(d)) => d,
        other => panic!("expected a diagnostic, got {other:?}"),
    }
}

#[test]
fn global_args_reach_from_lines_only_unless_redeclared() {
    let text = "ARG V=3.19\nFROM alpine:$V\nLABEL before=\"[$V]\"\nARG V\nLABEL after=$V\n";
    let g = graph(text);
    assert_eq!(g.stages()[0].base, Base::Image("alpine:3.19".to_owned()));
    assert_eq!(find(&g, "FROM").1.env, pairs(&[("V", "3.19")]));
    assert_eq!(find(&g, "LABEL before").1.label, "LABEL before=[]");
    assert_eq!(find(&g, "LABEL after").1.label, "LABEL after=3.19");
    assert_eq!(find(&g, "LABEL after").1.env, pairs(&[("V", "3.19")]));

    let g = plan(text, None, &[("V", "4")]).unwrap();
    assert_eq!(g.stages()[0].base, Base::Image("alpine:4".to_owned()));
    assert_eq!(find(&g, "LABEL after").1.label, "LABEL after=4");
}

#[test]
fn stage_arg_defaults_build_args_and_env_precedence() {
    let text = "FROM a\nARG X=1 U\nLABEL x=$X u=${U-unset}\nARG A=arg\nENV A=env\nLABEL a=$A\nENV A=2 B=$A\nLABEL b=$B\nRUN true\n";
    let g = graph(text);
    assert_eq!(find(&g, "LABEL x").1.label, "LABEL x=1 u=unset");
    assert_eq!(find(&g, "LABEL a").1.label, "LABEL a=env");
    // Every pair of one ENV is expanded with the values from before it.
    assert_eq!(find(&g, "LABEL b").1.label, "LABEL b=env");
    assert_eq!(
        find(&g, "RUN").1.env,
        pairs(&[("A", "2"), ("B", "env"), ("X", "1")])
    );

    let g = plan(text, None, &[("X", "9"), ("U", "u")]).unwrap();
    assert_eq!(find(&g, "LABEL x").1.label, "LABEL x=9 u=u");
    assert!(find(&g, "ARG").1.instruction.contains(r#"["X","9"]"#));
}

#[test]
fn proxy_args_reach_run_without_declaration_but_do_not_expand() {
    let g = plan(
        "FROM a\nLABEL p=x$HTTP_PROXY\nRUN curl x\n",
        None,
        &[("HTTP_PROXY", "http://p"), ("OTHER", "o")],
    )
    .unwrap();
    assert_eq!(find(&g, "LABEL").1.label, "LABEL p=x");
    assert_eq!(find(&g, "RUN").1.env, pairs(&[("HTTP_PROXY", "http://p")]));
}

#[test]
fn from_stage_inherits_env_and_args_with_values() {
    // As BuildKit's dispatcher: a child stage starts from its parent's variables.
    let g = graph("FROM a AS base\nENV E=e\nARG R=r\nARG N\nFROM base\nLABEL l=$E$R${N-unset}\n");
    assert_eq!(g.stages()[1].base, Base::Stage(0));
    assert_eq!(find(&g, "LABEL").1.label, "LABEL l=erunset");
}

#[test]
fn an_arg_after_an_env_of_the_same_name_wins() {
    let text = "FROM a\nENV X=env\nARG X=arg\nLABEL x=$X\nRUN true\nARG X\nLABEL y=$X\n";
    let g = graph(text);
    assert_eq!(find(&g, "LABEL x").1.label, "LABEL x=arg");
    assert_eq!(find(&g, "RUN").1.env, pairs(&[("X", "arg")]));
    // A bare ARG X changes nothing.
    assert_eq!(find(&g, "LABEL y").1.label, "LABEL y=arg");
    let g = plan(text, None, &[("X", "cli")]).unwrap();
    assert_eq!(find(&g, "LABEL x").1.label, "LABEL x=cli");
}

#[test]
fn target_prunes_an_unneeded_broken_stage() {
    let text = "FROM a AS ok\nRUN make\n\nFROM b AS broken\nCOPY --from=7 x y\nEXPOSE notaport\nLABEL v=${NOPE:?required}\n";
    let g = plan(text, Some("ok"), &[]).unwrap();
    assert_eq!(g.stages().len(), 1);
    assert!(g.nodes().all(|(_, n)| n.stage.is_none_or(|s| s == 0)));
    let err = stage_error(text, None);
    assert_eq!(
        (err.kind, err.line, err.keyword.as_str()),
        (DiagnosticKind::StageReference, 5, "COPY")
    );
    assert!(matches!(
        plan(text, Some("nope"), &[]),
        Err(PlanError::UnknownTarget { .. })
    ));
}

#[test]
fn bad_semantics_in_a_needed_stage_fail_at_their_line() {
    let err = stage_error("FROM a\nEXPOSE 80\nEXPOSE notaport\n", None);
    assert_eq!((err.kind, err.line), (DiagnosticKind::Semantic, 3));
    let err = stage_error("FROM a\n\nLABEL v=\"${NOPE:?is required}\"\n", None);
    assert_eq!((err.kind, err.line), (DiagnosticKind::Expansion, 3));
    assert_eq!(err.message, "NOPE: is required");
    let err = stage_error("FROM a\nARG M=8\nCOPY --chmod=$M x /x\n", None);
    assert_eq!((err.kind, err.line), (DiagnosticKind::Semantic, 3));
    assert!(
        err.message.contains("--chmod=8 is not an octal mode"),
        "{}",
        err.message
    );
    let err = stage_error("FROM a\n\nCOPY https://example.com/x /x\n", None);
    assert_eq!((err.kind, err.line), (DiagnosticKind::Semantic, 3));
    assert!(err.message.contains("use ADD"), "{}", err.message);
}

#[test]
fn undefined_forward_and_self_stage_references_fail_at_their_line() {
    let err = stage_error("FROM a\nCOPY --from=3 x y\n", None);
    assert_eq!(
        (err.kind, err.line, err.column),
        (DiagnosticKind::StageReference, 2, 1)
    );
    let err = stage_error(
        "FROM a AS one\nCOPY --from=two x y\nFROM b AS two\n",
        Some("one"),
    );
    assert_eq!((err.kind, err.line), (DiagnosticKind::StageReference, 2));
    let err = stage_error("FROM a AS one\n  COPY --from=one x y\n", None);
    assert_eq!(
        (err.kind, err.line, err.column),
        (DiagnosticKind::StageReference, 2, 3)
    );
    let err = stage_error("FROM later\nFROM b AS later\n", None);
    assert_eq!((err.kind, err.line), (DiagnosticKind::StageReference, 1));
    let rendered = err.to_string();
    assert!(
        rendered.starts_with("Dockerfile:1:1: FROM later: stage \"later\" is defined later"),
        "{rendered}"
    );
    assert!(rendered.ends_with("\nFROM later\n^"), "{rendered}");
}

#[test]
fn copy_from_index_name_and_image() {
    let g = graph(
        "FROM a\nRUN one\nFROM b AS two\nRUN two\nFROM c\nCOPY --from=1 /x /x\nCOPY --from=0 /y /y\nCOPY --from=busybox /bin/sh /sh\n",
    );
    let edges: Vec<(u32, u32)> = g.edges().collect();
    let stage_end = |i: usize| g.stages()[i].node.index() as u32;
    // `--from` shows what it resolved to: the stage name when it has one.
    let (x, _) = find(&g, "COPY --from=two /x");
    let (y, _) = find(&g, "COPY --from=0");
    let (sh, _) = find(&g, "COPY --from=busybox");
    assert!(edges.contains(&(stage_end(1), x.index() as u32)));
    assert!(edges.contains(&(stage_end(0), y.index() as u32)));
    let (image, node) = find(&g, "image busybox");
    assert_eq!((node.kind, node.stage), (NodeKind::BaseImage, None));
    assert!(edges.contains(&(image.index() as u32, sh.index() as u32)));
}

#[test]
fn context_sources_carry_patterns_and_excludes() {
    let g = graph(
        "FROM a\nARG D=src\nCOPY --exclude=*.md $D/ lib /app/\nADD https://x/y.tgz /y\nCOPY <<EOF /f\nhi\nEOF\n",
    );
    let (ctx, node) = find(&g, "context");
    assert_eq!(node.kind, NodeKind::ContextSource);
    assert_eq!(node.sources, ["src/", "lib"]);
    assert_eq!(node.excludes, ["*.md"]);
    let (copy, copy_node) = find(&g, "COPY src/");
    assert_eq!(copy_node.kind, NodeKind::Filesystem);
    assert_eq!(copy_node.env, pairs(&[("D", "src")]));
    assert!(
        copy_node
            .instruction
            .starts_with(r#"COPY --exclude="*.md" ["src/","lib","/app/"]"#)
    );
    assert!(
        g.edges()
            .any(|e| e == (ctx.index() as u32, copy.index() as u32))
    );
    // Remote and inline sources read nothing from the context.
    assert_eq!(
        g.nodes()
            .filter(|(_, n)| n.kind == NodeKind::ContextSource)
            .count(),
        1
    );
}

#[test]
fn three_stages_two_independent() {
    let text = "FROM alpine AS a\nRUN make a\n\nFROM debian AS b\nWORKDIR /b\nRUN make b\n\nFROM scratch\nCOPY --from=a /a /a\nCOPY --from=b /b /b\nCMD [\"/a\"]\n";
    let g = graph(text);
    let nodes_of = |stage: u32| -> Vec<NodeIndex> {
        g.nodes()
            .filter(|(_, n)| n.stage == Some(stage))
            .map(|(i, _)| NodeIndex::new(i as usize))
            .collect()
    };
    for &x in &nodes_of(0) {
        for &y in &nodes_of(1) {
            assert!(
                !has_path_connecting(g.graph(), x, y, None),
                "{x:?} reaches {y:?}"
            );
            assert!(
                !has_path_connecting(g.graph(), y, x, None),
                "{y:?} reaches {x:?}"
            );
        }
    }
    for stage in [0, 1] {
        assert!(has_path_connecting(
            g.graph(),
            g.stages()[stage].node,
            g.export(),
            None
        ));
    }
    let kinds: Vec<&str> = g.nodes().map(|(_, n)| n.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "base-image",
            "filesystem",
            "stage", // a
            "base-image",
            "filesystem",
            "filesystem",
            "stage", // b
            "base-image",
            "filesystem",
            "filesystem",
            "metadata",
            "stage", // final
            "export"
        ]
    );
    // Each node knows the previous node of its chain.
    let (run_b, node) = find(&g, "RUN make b");
    assert_eq!(g.node(node.parent.unwrap()).label, "WORKDIR /b");
    assert_eq!(node.lines, Some((6, 6)));
    assert!(
        g.edges()
            .any(|e| e == (node.parent.unwrap().index() as u32, run_b.index() as u32))
    );
    // Creation order is a valid topological order.
    let order = g.toposort();
    let position = |n: NodeIndex| order.iter().position(|&o| o == n).unwrap();
    assert!(
        g.edges()
            .all(|(a, b)| position(NodeIndex::new(a as usize))
                < position(NodeIndex::new(b as usize)))
    );
    assert_eq!(
        toposort(g.graph(), None).map(|o| o.len()).ok(),
        Some(order.len())
    );
}

#[test]
fn cmd_changes_only_its_own_node() {
    let a = graph("FROM a\nRUN make\nCMD [\"a\"]\n");
    let b = graph("FROM a\nRUN make\nCMD [\"b\"]\n");
    let differing: Vec<&str> = a
        .nodes()
        .zip(b.nodes())
        .filter(|((_, x), (_, y))| x.instruction != y.instruction)
        .map(|((_, x), _)| x.label.as_str())
        .collect();
    assert_eq!(differing, ["CMD a"]);
}

#[test]
fn copy_heredocs_expand_unless_quoted_and_keep_their_quotes() {
    let g = graph("FROM a\nENV N=x\nCOPY <<EOF <<'RAW' /d/\n\"$N\" \\$N\nEOF\n$N\nRAW\n");
    let (_, node) = find(&g, "COPY");
    let Some(InstructionKind::Copy(copy)) = &node.step else {
        panic!("a COPY step")
    };
    assert_eq!(copy.heredocs[0].body, "\"x\" $N\n");
    assert_eq!(copy.heredocs[1].body, "$N\n");
    assert_eq!(node.env, pairs(&[("N", "x")]));
}

#[test]
fn automatic_platform_args_are_global() {
    let text = "FROM --platform=$BUILDPLATFORM a\nARG TARGETPLATFORM\nRUN x\n";
    let g = graph(text);
    let platform = g.stages()[0].platform.clone().expect("a platform");
    assert!(platform.contains('/'), "{platform}");
    let run = find(&g, "RUN").1;
    assert!(run.env.contains(&("TARGETPLATFORM".to_owned(), platform)));
    let g = plan(text, None, &[("TARGETPLATFORM", "linux/riscv64")]).unwrap();
    assert!(
        find(&g, "RUN")
            .1
            .env
            .contains(&("TARGETPLATFORM".to_owned(), "linux/riscv64".to_owned()))
    );
}

#[test]
fn base_image_env_feeds_expansion_when_known() {
    let df = frontend::parse(
        "FROM golang:1 AS b\nENV PATH=/opt/bin:$PATH\nFROM b\nRUN go\n",
        "D",
    )
    .unwrap();
    let base_env = |image: &str, _: Option<&str>| {
        assert_eq!(image, "golang:1");
        BaseInfo {
            env: vec![("PATH".to_owned(), "/usr/bin".to_owned())],
            on_build: vec![],
        }
    };
    let g = lower_with_base_env(&df, &PlanOptions::default(), &base_env).unwrap();
    assert_eq!(find(&g, "ENV").1.label, "ENV PATH=/opt/bin:/usr/bin");
    assert_eq!(
        find(&g, "RUN").1.env,
        pairs(&[("PATH", "/opt/bin:/usr/bin")])
    );
    let g = lower(&df, &PlanOptions::default()).unwrap();
    assert_eq!(find(&g, "ENV").1.label, "ENV PATH=/opt/bin:");
}

#[test]
fn run_mounts_are_checked_after_expansion() {
    let ok = "FROM a\nARG C=/root/.cache\nRUN --mount=type=cache,target=$C make\n";
    let g = graph(ok);
    let Some(InstructionKind::Run(run)) = &find(&g, "RUN").1.step else {
        panic!("a RUN step")
    };
    assert_eq!(run.mounts[0], "type=cache,target=/root/.cache");
    for (bad, message) in [
        (
            "FROM a\nRUN --mount=type=nfs,target=/x true\n",
            "--mount: unknown mount type \"nfs\" (bind, cache, tmpfs, secret or ssh)",
        ),
        (
            "FROM a\nRUN --mount=type=cache true\n",
            "--mount: a cache mount needs a target",
        ),
        (
            "FROM a\nRUN --mount=target=/x,colour=red true\n",
            "--mount: unknown key \"colour\"",
        ),
        (
            "FROM a\nARG K=size\nRUN --mount=type=cache,target=/x,$K=1 true\n",
            "--mount: key \"size\" does not apply to a cache mount",
        ),
    ] {
        let err = stage_error(bad, None);
        assert_eq!(err.kind, DiagnosticKind::Unsupported, "{bad:?}");
        assert_eq!(
            (err.line as usize, err.column),
            (bad.lines().count(), 5),
            "{bad:?}"
        );
        assert_eq!(err.message, message);
    }
}

/// BuildKit's documented flags, instruction by instruction (Dockerfile reference, 1.x
/// syntax): each one either plans (and the engine does what BuildKit does with it) or is
/// refused at its line, pointing at the flag, with a message naming it. Nothing in between.
#[test]
fn every_buildkit_flag_is_implemented_or_refused_by_name() {
    let implemented = [
        "FROM --platform=$BUILDPLATFORM a",
        "FROM --platform=$TARGETPLATFORM a",
        "FROM a\nRUN --mount=type=cache,id=x,target=/c,sharing=locked,mode=0700,uid=1,gid=1,ro=false true",
        "FROM a\nRUN --mount=type=tmpfs,target=/t,size=64m true",
        "FROM a\nRUN --mount=type=secret,id=s,target=/s,env=S,required,mode=0440,uid=1,gid=2 true",
        "FROM a\nRUN --mount=type=ssh,id=github,target=/agent,required true",
        "FROM a\nRUN --mount=type=bind,source=go.sum,target=/src/go.sum,rw true",
        "FROM b AS s\nFROM a\nRUN --mount=from=s,source=/out,target=/in --mount=from=img:1,target=/i true",
        "FROM a\nRUN --network=default true",
        "FROM a\nRUN --network=none true",
        "FROM a\nRUN --network=host true",
        "FROM a\nRUN --security=sandbox true",
        "FROM b AS s\nFROM a\nCOPY --from=s --chown=1:1 --chmod=0644 --link x /y",
        "FROM a\nCOPY --exclude=*.log --exclude=tmp x /y",
        "FROM b AS s\nFROM a\nCOPY --from=s --exclude=*.md x /y",
        "FROM a\nADD --chown=1 --chmod=644 --link --exclude=*.md x /y",
        "FROM a\nADD --checksum=sha256:0000000000000000000000000000000000000000000000000000000000000000 https://h/f /y",
        "FROM a\nHEALTHCHECK --interval=5s --timeout=3s --start-period=1s --start-interval=1s --retries=3 CMD true",
    ];
    for text in implemented {
        plan(&format!("{text}\n"), None, &[]).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    }
    // (Dockerfile, the flag the caret points at, the message).
    let refused = [
        (
            "FROM --platform=linux/s390x a",
            "--platform",
            "--platform=linux/s390x: only the host platform",
        ),
        (
            "FROM a\nRUN --security=insecure true",
            "--security",
            "--security=insecure is not supported",
        ),
        (
            "FROM a\nRUN --mount=type=ssh,mode=0600 true",
            "--mount",
            "--mount=type=ssh: mode=, uid= and gid= are not supported yet",
        ),
        (
            "FROM a\nRUN --mount=type=cache,target=/c,from=a true",
            "--mount",
            "--mount=type=cache: from= and source= (seeding a cache from a stage) are not supported yet",
        ),
        (
            "FROM a\nCOPY --parents a/b /d/",
            "--parents",
            "COPY --parents is not supported yet",
        ),
        (
            "FROM a\nADD --keep-git-dir https://h/r.git /src",
            "--keep-git-dir",
            "ADD --keep-git-dir: ADD of a git repository is not supported yet",
        ),
        (
            "FROM a\nADD https://h/r.git#v1 /src",
            "ADD",
            "ADD of a git repository (https://h/r.git#v1) is not supported yet",
        ),
        (
            "FROM a\nADD git@github.com:o/r.git /src",
            "ADD",
            "ADD of a git repository (git@github.com:o/r.git) is not supported yet",
        ),
    ];
    for (text, at, message) in refused {
        let err = stage_error(&format!("{text}\n"), None);
        let last = text.lines().last().unwrap_or_default();
        assert_eq!(err.kind, DiagnosticKind::Unsupported, "{text:?}");
        assert_eq!(err.line as usize, text.lines().count(), "{text:?}");
        assert_eq!(err.column as usize, last.find(at).unwrap() + 1, "{text:?}");
        assert!(
            err.message.starts_with(message),
            "{text:?}: {}",
            err.message
        );
    }
    // Flags BuildKit has and the typed layer does not know: refused while parsing.
    for (text, flag) in [
        ("FROM a\nRUN --device=/dev/fuse true", "--device"),
        ("FROM a\nADD --unpack=true x.tar /y", "--unpack"),
        ("FROM a\nCOPY --checksum=sha256:00 x /y", "--checksum"),
        ("FROM a\nADD --from=s x /y", "--from"),
        ("FROM a\nWORKDIR --parents /x", "--parents"),
    ] {
        let err = frontend::parse(&format!("{text}\n"), "Dockerfile").unwrap_err();
        assert_eq!(err.kind, DiagnosticKind::UnknownFlag, "{text:?}");
        assert_eq!(
            (err.line, err.message.clone()),
            (2, format!("unknown flag: {flag}"))
        );
    }
}

#[test]
fn a_bare_global_redeclaration_keeps_the_value() {
    let g = graph("ARG V=1\nARG V\nARG TARGETOS\nFROM a:$V-$TARGETOS\n");
    let base = g.stages()[0].base.to_string();
    assert!(
        base.starts_with("image a:1-") && !base.ends_with('-'),
        "{base}"
    );
}

#[test]
fn onbuild_triggers_run_first_in_a_child_stage_or_image() {
    let text = "FROM scratch AS parent\nONBUILD RUN echo triggered\nRUN parent-only\n\nFROM parent\nRUN child\n";
    let df = crate::frontend::parse(text, "Dockerfile").expect("parse");
    let graph = lower(&df, &PlanOptions::default()).expect("plan");
    let child: Vec<&str> = graph
        .nodes()
        .filter(|(_, n)| n.stage == Some(1) && n.step.is_some())
        .map(|(_, n)| n.label.as_str())
        .collect();
    assert_eq!(child, ["RUN echo triggered", "RUN child"]);

    let from_image = "FROM base:1\nRUN own\n";
    let df = crate::frontend::parse(from_image, "Dockerfile").expect("parse");
    let info = |_: &str, _: Option<&str>| BaseInfo {
        env: vec![],
        on_build: vec!["COPY . /app".into()],
    };
    let graph = lower_with_base_env(&df, &PlanOptions::default(), &info).expect("plan");
    let steps: Vec<&str> = graph
        .nodes()
        .filter(|(_, n)| n.step.is_some())
        .map(|(_, n)| n.label.as_str())
        .collect();
    assert_eq!(steps, ["COPY . /app", "RUN own"]);
}

#[test]
fn bind_mounts_are_inputs_of_their_run_as_copies_are() {
    let g = graph(
        "FROM a AS deps\nRUN make\nFROM b AS unused\nFROM c\nRUN --mount=source=go.sum,target=/s/go.sum --mount=from=deps,target=/d --mount=from=img:1,target=/i true\n",
    );
    let (run, _) = find(&g, "RUN true");
    let inputs: Vec<&Node> = g
        .graph()
        .neighbors_directed(run, petgraph::Direction::Incoming)
        .map(|n| g.node(n))
        .collect();
    assert!(
        inputs
            .iter()
            .any(|n| n.kind == NodeKind::ContextSource && n.sources == ["go.sum"])
    );
    assert!(
        inputs
            .iter()
            .any(|n| n.kind == NodeKind::Stage && n.stage == Some(0))
    );
    assert!(inputs.iter().any(|n| n.image.as_deref() == Some("img:1")));
    assert_eq!(
        g.stages().len(),
        2,
        "the bound stage is needed, the other is not"
    );
}
