//! The store's invariants, on a real temp root.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::image::oci::{ImageConfig, MediaTypes, manifest_json};

fn open(dir: &Path) -> Store {
    Store::open(&Layout::new(dir), StoreOptions::default()).expect("open store")
}

/// Waits (bounded) until the trash thread has unlinked what the passes removed.
fn settle(store: &Store) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.stats().gc_running {
        assert!(
            std::time::Instant::now() < deadline,
            "the trash is never emptied"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn tmp_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("tmp")).expect("tmp").count() == 0
}

/// A step's result made the way a build makes it: a layer blob and its unpacked directory,
/// recorded under `key`.
fn action(lease: &Lease, key: u8, bytes: usize) -> ActionResult {
    let content: Vec<u8> = (0..bytes).map(|i| (i as u8) ^ key).collect();
    let mut writer = lease.cas().writer().expect("writer");
    writer.write_all(&content).expect("write");
    let blob = writer.commit(None).expect("commit");
    let diff_id = Digest::of(&[b"diff".as_slice(), &[key]].concat());
    let staging = lease.cas().shared.scratch("test-").expect("scratch");
    std::fs::write(staging.join("file"), &content).expect("file");
    lease.adopt(&diff_id, &staging).expect("adopt");
    let result = ActionResult {
        layers: vec![LayerRecord {
            blob,
            diff_id,
            media_type: MediaTypes::Oci.layer_gzip().to_owned(),
            content_id: [key; 32],
        }],
    };
    lease.record_action(&[key; 32], &result).expect("record");
    result
}

/// Tags an image made of `result`'s layers.
fn tag(store: &Store, lease: &Lease, name: &str, result: &ActionResult) -> ImageRecord {
    let layers: Vec<Layer> = result.layers.iter().map(Layer::from).collect();
    let mut config = ImageConfig::parse(b"{\"architecture\":\"amd64\",\"os\":\"linux\",\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]}}")
        .expect("config");
    config.diff_ids = layers.iter().map(|l| l.diff_id.clone()).collect();
    let cas = lease.cas();
    let config_blob = cas.put(&config.to_json()).expect("config blob");
    let manifest = cas
        .put(&manifest_json(MediaTypes::Oci, &config_blob, &layers))
        .expect("manifest");
    let record = ImageRecord {
        name: name.to_owned(),
        manifest,
        config: config_blob.digest,
        created_unix: 1,
    };
    store.tag(lease, &record).expect("tag");
    record
}

fn options(keep_bytes: u64) -> GcOptions {
    GcOptions {
        keep_bytes,
        keep_duration: None,
        all: false,
        cache_mounts_only: false,
        dry_run: false,
        time_limit: None,
    }
}

/// What `du` says the store's managed parts take.
fn du(dir: &Path) -> u64 {
    [
        "cas-v1",
        "layers-v1",
        "index-v1.sqlite",
        "index-v1.sqlite-wal",
        "index-v1.sqlite-shm",
    ]
    .iter()
    .map(|p| layers::disk_usage(&dir.join(p)))
    .sum()
}

#[test]
fn blobs_are_verified_when_written_and_read_and_counted_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let cas = store.cas();
    let blob = cas.put(b"hello").expect("put");
    assert_eq!(
        blob.digest.as_str(),
        "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );
    assert!(
        dir.path()
            .join("cas-v1/sha256/2c")
            .join(blob.digest.hex())
            .is_file()
    );
    assert_eq!(cas.read(&blob.digest).expect("read"), b"hello");
    cas.put(b"hello").expect("again");
    assert_eq!(store.stats().blobs, 1);

    let mut writer = cas.writer().expect("writer");
    writer.write_all(b"tampered").expect("write");
    let claimed = Digest::of(b"original");
    let err = writer.commit(Some(&claimed)).expect_err("mismatch");
    assert!(err.to_string().contains(claimed.as_str()), "{err}");
    assert!(!cas.contains(&claimed) && !cas.contains(&Digest::of(b"tampered")));
    assert!(tmp_is_empty(dir.path()));
    assert_eq!(store.stats().blobs, 1);

    assert!(Digest::parse("sha256:abc").is_err());
    assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_err());
}

#[test]
fn a_damaged_blob_is_removed_with_every_action_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let lease = store.lease();
    let flipped = action(&lease, 1, 10_000);
    let truncated = action(&lease, 2, 10_000);
    assert!(lease.claim(&[1; 32], &flipped));

    // A flipped byte: found when the blob is read to its end.
    let blob = &flipped.layers[0].blob;
    let path = store.cas().path(&blob.digest);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[100] ^= 1;
    std::fs::write(&path, &bytes).expect("flip");
    let mut reader = lease.cas().open(blob).expect("open");
    let err = std::io::copy(&mut reader, &mut std::io::sink()).expect_err("damaged");
    assert!(err.to_string().contains("damaged"), "{err}");
    assert!(lease.saw_damage());
    assert!(!path.exists(), "the damaged blob is gone");
    assert_eq!(
        lease.action(&[1; 32]).expect("lookup"),
        None,
        "its action is a miss"
    );

    // A truncation: found by the size check of a cache hit, before anything reads it.
    let blob = &truncated.layers[0].blob;
    std::fs::write(store.cas().path(&blob.digest), b"short").expect("truncate");
    assert!(!lease.claim(&[2; 32], &truncated));
    assert_eq!(lease.action(&[2; 32]).expect("lookup"), None);
    let stats = store.stats();
    assert_eq!((stats.blobs, stats.actions), (0, 0));

    // A damaged small document is replaced when it is stored again.
    let config = store.cas().put(b"{\"config\":1}").expect("put");
    let path = store.cas().path(&config.digest);
    std::fs::write(&path, b"{\"config\":2}").expect("same size, other bytes");
    store.cas().put(b"{\"config\":1}").expect("put again");
    assert_eq!(
        store.cas().read(&config.digest).expect("read"),
        b"{\"config\":1}"
    );
}

#[test]
fn gc_keeps_tags_and_leases_and_removes_the_least_recently_used_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let builder = store.lease();
    let results: Vec<ActionResult> = (1..=6).map(|k| action(&builder, k, 200_000)).collect();
    // Oldest first: 1, 2, ... 6; but 1 is tagged and 2 is held by a running build.
    for k in 1..=6u8 {
        store.shared.index.set_last_used(&[k; 32], i64::from(k));
    }
    let tagged = tag(&store, &builder, "app:1", &results[0]);
    drop(builder);
    // The build that tagged pinned every action it used; untag and re-tag with only one.
    store.untag("app:1").expect("untag");
    let tagger = store.lease();
    assert!(tagger.claim(&[1; 32], &results[0]));
    store.tag(&tagger, &tagged).expect("tag");
    drop(tagger);
    let running = store.lease();
    assert!(running.claim(&[2; 32], &results[1]));
    store.shared.flush_touched().expect("flush");
    for k in 1..=6u8 {
        store.shared.index.set_last_used(&[k; 32], i64::from(k));
    }

    let before = store.stats().total_bytes;
    let one = store.shared.counters.layer_bytes.load(Ordering::Relaxed) / 6
        + store.shared.counters.blob_bytes.load(Ordering::Relaxed) / 8;
    let dry = store
        .gc(&GcOptions {
            dry_run: true,
            ..options(before - 2 * one)
        })
        .expect("dry");
    assert_eq!(dry.removed_actions, 2, "{dry:?}");
    let stored = |stats: StoreStats| stats.blob_bytes + stats.layer_bytes;
    let stored_before = stored(store.stats());
    assert_eq!(
        stored(store.stats()),
        stored_before,
        "a dry run removes nothing"
    );

    let report = store.gc(&options(before - 2 * one)).expect("gc");
    assert_eq!(report.removed_actions, 2, "{report:?}");
    assert!(
        stored(store.stats()) <= stored_before - 2 * one,
        "{report:?}"
    );
    let lookup = store.lease();
    let kept: Vec<u8> = (1..=6u8)
        .filter(|k| lookup.action(&[*k; 32]).expect("lookup").is_some())
        .collect();
    assert_eq!(kept, [1, 2, 5, 6], "3 and 4 were the oldest unpinned");
    assert!(lookup.claim(&[1; 32], &results[0]) && lookup.claim(&[2; 32], &results[1]));
    assert!(store.cas().read(&tagged.manifest.digest).is_ok());
    assert!(!store.cas().contains(&results[2].layers[0].blob.digest));
    assert!(
        !store
            .shared
            .layer_path(&results[2].layers[0].diff_id)
            .exists()
    );
    drop(lookup);

    // --all: everything no tag and no lease holds.
    let report = store
        .gc(&GcOptions {
            all: true,
            ..options(u64::MAX)
        })
        .expect("all");
    assert_eq!(report.removed_actions, 2, "{report:?}");
    let lookup = store.lease();
    assert!(lookup.action(&[1; 32]).expect("tagged").is_some());
    assert!(lookup.action(&[2; 32]).expect("leased").is_some());
    drop((lookup, running));
    settle(&store);
    let stats = store.stats();
    assert_eq!(stats.actions, 2);
    let measured = du(dir.path());
    assert!(
        stats.total_bytes.abs_diff(measured) * 10 <= measured,
        "counted {} vs du {measured}",
        stats.total_bytes
    );
    assert!(tmp_is_empty(dir.path()));
}

#[test]
fn unused_longer_than_keep_duration_goes_whatever_the_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let lease = store.lease();
    action(&lease, 1, 1000);
    action(&lease, 2, 1000);
    drop(lease);
    store.shared.flush_touched().expect("flush");
    store.shared.index.set_last_used(&[1; 32], 0);
    let report = store
        .gc(&GcOptions {
            keep_duration: Some(Duration::from_secs(3600)),
            ..options(u64::MAX)
        })
        .expect("gc");
    assert_eq!(report.removed_actions, 1);
    let lease = store.lease();
    assert!(lease.action(&[1; 32]).expect("lookup").is_none());
    assert!(lease.action(&[2; 32]).expect("lookup").is_some());
}

#[test]
fn what_a_crash_left_is_collected_and_the_index_never_names_a_missing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path());
        let lease = store.lease();
        action(&lease, 1, 5000);
    }
    // A blob linked into place whose row never came, a layer directory likewise.
    let orphan = Digest::of(b"orphan");
    let path = dir.path().join("cas-v1/sha256").join(&orphan.hex()[..2]);
    std::fs::create_dir_all(&path).expect("shard");
    std::fs::write(path.join(orphan.hex()), b"orphan").expect("orphan blob");
    std::fs::create_dir_all(dir.path().join("layers-v1/00112233deadbeef")).expect("orphan dir");
    let store = open(dir.path());
    let report = store.gc(&options(u64::MAX)).expect("gc");
    assert_eq!(
        (report.removed_blobs, report.removed_layers),
        (1, 1),
        "{report:?}"
    );
    assert!(!path.join(orphan.hex()).exists());
    let lease = store.lease();
    let result = lease.action(&[1; 32]).expect("lookup").expect("kept");
    assert!(lease.claim(&[1; 32], &result));
}

#[test]
fn garbage_over_the_index_is_moved_aside_and_the_store_rebuilt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (blob_bytes, tagged) = {
        let store = open(dir.path());
        let lease = store.lease();
        let result = action(&lease, 1, 5000);
        let tagged = tag(&store, &lease, "app:1", &result);
        (store.stats().blob_bytes, tagged)
    };
    std::fs::write(dir.path().join("index-v1.sqlite"), vec![0x5a; 64 << 10]).expect("garbage");
    let _ = std::fs::remove_file(dir.path().join("index-v1.sqlite-wal"));
    let store = open(dir.path());
    assert!(dir.path().join("index-v1.sqlite.damaged").is_file());
    let stats = store.stats();
    assert_eq!(
        stats.blob_bytes, blob_bytes,
        "every blob on disk has its row again"
    );
    assert_eq!(stats.actions, 0, "the cached steps will run again");
    // Nothing tags the image any more: GC may take it all, and leaves the store consistent.
    assert!(
        store
            .images()
            .expect("images")
            .iter()
            .all(|i| i.name != tagged.name)
    );
    store
        .gc(&GcOptions {
            all: true,
            ..options(0)
        })
        .expect("gc");
    assert_eq!(store.stats().blobs, 0);
}

/// Overwrites every page of the index after the first (the schema stays readable, the
/// tables do not).
fn damage_pages(db: &Path) {
    let mut bytes = std::fs::read(db).expect("read");
    let from = 4096.min(bytes.len());
    for byte in &mut bytes[from..] {
        *byte = 0xa5;
    }
    std::fs::write(db, bytes).expect("damage");
}

fn populated(dir: &Path) -> Store {
    let store = open(dir);
    let lease = store.lease();
    for k in 1..=60 {
        action(&lease, k, 100);
    }
    store.shared.index.checkpoint().expect("checkpoint");
    store
}

#[test]
fn damaged_index_pages_found_at_start_are_repaired_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(populated(dir.path()));
    damage_pages(&dir.path().join("index-v1.sqlite"));
    let store = open(dir.path());
    assert!(dir.path().join("index-v1.sqlite.damaged").is_file());
    assert_eq!(store.stats().blobs, 60, "rows again for the blobs on disk");
    assert_eq!(store.lease().action(&[1; 32]).expect("works"), None);
}

#[test]
fn damaged_index_pages_found_later_are_named_in_the_error_and_repaired_for_the_next_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = populated(dir.path());
    let db = dir.path().join("index-v1.sqlite");
    damage_pages(&db);
    // Another writer makes the store's connection drop the pages it had cached.
    rusqlite::Connection::open(&db)
        .and_then(|c| c.pragma_update(None, "user_version", 2))
        .expect("bump");
    let lease = store.lease();
    let err = (1..=60u8)
        .find_map(|k| lease.action(&[k; 32]).err())
        .expect("a damaged page is found");
    assert!(err.to_string().contains("index-v1.sqlite"), "{err}");
    assert_eq!(lease.action(&[1; 32]).expect("the index works again"), None);
    assert!(dir.path().join("index-v1.sqlite.damaged").is_file());
    assert_eq!(store.stats().blobs, 60);
}
