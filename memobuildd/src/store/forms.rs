//! A layer's forms: the store keeps a layer MemoBuild wrote as its plain tar (blob digest =
//! diff-id); an export, push or remote upload that needs it gzip'd or zstd'd makes that form
//! once, from the tar, and the store keeps it beside the layer (table `forms`) for as long as
//! the layer stays: GC keeps a form with its layer and removes it with it.
//!
//! A form's bytes depend only on the tar and the form (format and level), so the same layer
//! exported twice, or on two machines, gives the same digest.

use std::io::{self, BufWriter, Write};

use super::blobs::Digest;
use super::{Lease, StoreError};
use crate::image::compress::{Compression, Compressor};
use crate::image::layer::Layer;
use crate::image::oci::MediaTypes;
use crate::image::unpack::decompress;

impl Lease {
    /// `layer` in `compression`. A layer that arrived compressed (a base image's) stays as
    /// the registry gave it unless `force` asks for another format, as BuildKit's
    /// `force-compression`; a layer MemoBuild wrote (a plain tar) gets the form made
    /// earlier, or one made now from its blob. Held by this lease either way.
    pub fn layer_as(
        &self,
        layer: &Layer,
        compression: Compression,
        force: bool,
    ) -> Result<Layer, StoreError> {
        let cas = self.cas();
        let plain = Compression::Uncompressed.matches(&layer.media_type);
        let as_is = if plain {
            compression == Compression::Uncompressed
        } else {
            !force || compression.matches(&layer.media_type)
        };
        if as_is {
            self.hold_blob(&layer.blob.digest);
            return Ok(layer.clone());
        }
        let form = compression.form();
        let shared = self.shared();
        let made = shared.ix(|index| index.form(&layer.diff_id, &form))?;
        let blob = match made {
            Some(blob) if cas.contains(&blob.digest) => {
                self.hold_blob(&blob.digest);
                blob
            }
            _ => {
                let source = cas.open(&layer.blob)?;
                let tar = decompress(source).map_err(|err| StoreError::Unpack {
                    digest: layer.blob.digest.clone(),
                    message: err.to_string(),
                })?;
                let blob = compress(&cas, tar, compression, &layer.blob.digest)?;
                shared.ix(|index| index.record_form(&layer.diff_id, &form, &blob))?;
                blob
            }
        };
        Ok(Layer {
            blob,
            media_type: compression.layer_media_type(MediaTypes::Oci).to_owned(),
            ..layer.clone()
        })
    }
}

/// Writes `tar` in `compression` as a new blob.
fn compress(
    cas: &super::Cas,
    mut tar: impl io::Read,
    compression: Compression,
    source: &Digest,
) -> Result<super::Blob, StoreError> {
    let writer = BufWriter::with_capacity(1 << 18, cas.writer()?);
    let failed = |what: &'static str| {
        move |err: io::Error| StoreError::Unpack {
            digest: source.clone(),
            message: format!("{what}: {err}"),
        }
    };
    let mut compressor =
        Compressor::new(writer, compression).map_err(failed("starting the compressor"))?;
    io::copy(&mut tar, &mut compressor).map_err(failed("compressing"))?;
    let mut writer = compressor.finish().map_err(failed("compressing"))?;
    writer.flush().map_err(failed("writing"))?;
    let writer = writer
        .into_inner()
        .map_err(|err| failed("writing")(err.into_error()))?;
    Ok(writer.commit(None)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::layer::{LayerOptions, write_layer};
    use crate::layout::Layout;
    use crate::store::{Store, StoreOptions};

    /// A layer of `tree` (the same tree makes the same tar: mtimes are kept, not taken now).
    fn layer(lease: &Lease, tree: &std::path::Path) -> Layer {
        write_layer(&lease.cas(), tree, &LayerOptions::default())
            .expect("write")
            .expect("a layer")
    }

    #[test]
    fn each_form_is_made_once_and_the_same_every_time() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(&Layout::new(dir.path()), StoreOptions::default()).expect("store");
        let lease = store.lease();
        let tree = tempfile::tempdir().expect("tree");
        std::fs::write(tree.path().join("text"), "hello ".repeat(10_000)).expect("text");
        let plain = layer(&lease, tree.path());
        assert_eq!(plain.blob.digest, plain.diff_id, "stored as its plain tar");
        let gzip = lease
            .layer_as(&plain, Compression::Gzip, false)
            .expect("gzip");
        assert_eq!(gzip.media_type, MediaTypes::Oci.layer_gzip());
        assert!(gzip.blob.size < plain.blob.size / 10, "{gzip:?}");
        assert_eq!(gzip.diff_id, plain.diff_id);
        let zstd = lease
            .layer_as(&plain, Compression::Zstd { level: 3 }, false)
            .expect("zstd");
        assert_eq!(
            zstd.media_type,
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        // Asked again: the same blob, not made anew (its file is the one made first).
        let modified = |blob: &super::super::Blob| {
            std::fs::metadata(lease.cas().path(&blob.digest))
                .and_then(|m| m.modified())
                .expect("mtime")
        };
        let before = modified(&gzip.blob);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            lease
                .layer_as(&plain, Compression::Gzip, false)
                .expect("again"),
            gzip
        );
        assert_eq!(modified(&gzip.blob), before);
        // Made on another store from the same tar: the same bytes.
        let other_dir = tempfile::tempdir().expect("dir");
        let other =
            Store::open(&Layout::new(other_dir.path()), StoreOptions::default()).expect("store");
        let other_lease = other.lease();
        let other_plain = layer(&other_lease, tree.path());
        assert_eq!(other_plain.diff_id, plain.diff_id);
        let other_gzip = other_lease
            .layer_as(&other_plain, Compression::Gzip, false)
            .expect("gzip");
        assert_eq!(other_gzip.blob, gzip.blob);
        // A compressed layer keeps its format unless forced; forced to zstd it is converted.
        for (wanted, force) in [
            (Compression::Gzip, false),
            (Compression::Gzip, true),
            (Compression::Zstd { level: 3 }, false),
            (Compression::Uncompressed, false),
        ] {
            assert_eq!(
                lease.layer_as(&gzip, wanted, force).expect("as is"),
                gzip,
                "{wanted:?} force={force}"
            );
        }
        let forced = lease
            .layer_as(&gzip, Compression::Zstd { level: 3 }, true)
            .expect("forced");
        assert_eq!(forced.blob, zstd.blob, "the same form, from the same tar");
        let mut tar = Vec::new();
        io::Read::read_to_end(
            &mut decompress(lease.cas().open(&forced.blob).expect("open")).expect("zstd"),
            &mut tar,
        )
        .expect("read");
        assert_eq!(Digest::of(&tar), plain.diff_id);
    }
}
