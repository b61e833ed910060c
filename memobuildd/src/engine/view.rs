//! A read-only view of an image's root filesystem made of unpacked layers (overlay format:
//! whiteouts are 0:0 char devices, opaque directories carry an xattr), without mounting it.
//! COPY uses it to resolve destinations through the parent's symlinks and to read
//! `COPY --from` sources; USER uses it to read /etc/passwd and /etc/group.

use std::fs::Metadata;
use std::path::{Component, Path, PathBuf};

use crate::snapshot::{is_opaque, is_whiteout};

/// How many symlinks one lookup may follow before it is considered a loop (as Linux).
const MAX_SYMLINKS: usize = 40;

#[derive(Debug, Clone, Default)]
pub struct RootView {
    /// Unpacked layer directories, topmost first.
    layers: Vec<PathBuf>,
}

/// A path found in the view: where its bytes are on the host, and its metadata.
#[derive(Debug)]
pub struct Found {
    pub host: PathBuf,
    pub meta: Metadata,
}

impl RootView {
    pub fn new(layers: Vec<PathBuf>) -> Self {
        Self { layers }
    }

    /// `path` (image-absolute, already free of symlinks) as the merged filesystem shows it,
    /// without following a final symlink.
    pub fn lookup(&self, path: &Path) -> Option<Found> {
        let rel = relative(path);
        'layers: for layer in &self.layers {
            // A whiteout or a non-directory at an ancestor hides the path in this layer and
            // below; an opaque ancestor hides it below this layer.
            let mut hidden_below = false;
            let mut prefix = layer.clone();
            for component in rel.parent().into_iter().flat_map(Path::components) {
                prefix.push(component);
                match std::fs::symlink_metadata(&prefix) {
                    Ok(meta) if is_whiteout(&meta) || !meta.is_dir() => return None,
                    Ok(_) if is_opaque(&prefix) => hidden_below = true,
                    Ok(_) => {}
                    Err(_) => {
                        if hidden_below {
                            return None;
                        }
                        continue 'layers;
                    }
                }
            }
            let host = layer.join(&rel);
            match std::fs::symlink_metadata(&host) {
                Ok(meta) if is_whiteout(&meta) => return None,
                Ok(meta) => return Some(Found { host, meta }),
                Err(_) if hidden_below => return None,
                Err(_) => {}
            }
        }
        if rel.as_os_str().is_empty() {
            // The root exists even in an image with no layers.
            return std::fs::symlink_metadata("/").ok().map(|meta| Found {
                host: PathBuf::from("/nonexistent-root"),
                meta,
            });
        }
        None
    }

    /// Resolves every symlink in `path` within the image (absolute targets start at the
    /// image root, `..` stops at it). With `follow_last`, a final symlink is followed too.
    /// Components that do not exist are kept as they are.
    pub fn resolve(&self, path: &Path, follow_last: bool) -> PathBuf {
        let mut resolved = PathBuf::from("/");
        let mut pending: Vec<PathBuf> = components_rev(path);
        let mut hops = 0;
        while let Some(component) = pending.pop() {
            match component.to_str() {
                Some("..") => {
                    resolved.pop();
                    continue;
                }
                Some(".") => continue,
                _ => {}
            }
            let candidate = resolved.join(&component);
            let is_last = pending.is_empty();
            let link = self
                .lookup(&candidate)
                .filter(|found| found.meta.file_type().is_symlink())
                .and_then(|found| std::fs::read_link(&found.host).ok());
            match link {
                Some(target) if (!is_last || follow_last) && hops < MAX_SYMLINKS => {
                    hops += 1;
                    if target.is_absolute() {
                        resolved = PathBuf::from("/");
                    }
                    pending.extend(components_rev(&target));
                }
                _ => resolved = candidate,
            }
        }
        resolved
    }

    /// The content of a regular file, symlinks followed.
    pub fn read(&self, path: &Path) -> Option<Vec<u8>> {
        let found = self.lookup(&self.resolve(path, true))?;
        found
            .meta
            .is_file()
            .then(|| std::fs::read(&found.host).ok())?
    }

    /// The names in a directory of the merged view, sorted.
    pub fn list(&self, dir: &Path) -> Vec<String> {
        let rel = relative(dir);
        let mut names = std::collections::BTreeMap::<String, bool>::new();
        for layer in &self.layers {
            let host = layer.join(&rel);
            let Ok(entries) = std::fs::read_dir(&host) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                let whiteout = entry.metadata().is_ok_and(|m| is_whiteout(&m));
                // The topmost layer decides: a whiteout there hides lower copies.
                names.entry(name).or_insert(!whiteout);
            }
            if is_opaque(&host) {
                break;
            }
        }
        names
            .into_iter()
            .filter(|(name, present)| *present && self.lookup(&dir.join(name)).is_some())
            .map(|(name, _)| name)
            .collect()
    }
}

fn relative(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

fn components_rev(path: &Path) -> Vec<PathBuf> {
    let mut parts: Vec<PathBuf> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(PathBuf::from(name)),
            Component::ParentDir => Some(PathBuf::from("..")),
            _ => None,
        })
        .collect();
    parts.reverse();
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(root: &Path, name: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("layer");
        dir
    }

    #[test]
    fn upper_layers_win_and_symlinks_resolve_inside_the_image() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let lower = layer(tmp.path(), "lower");
        let upper = layer(tmp.path(), "upper");
        std::fs::create_dir_all(lower.join("srv/app")).expect("dir");
        std::fs::write(lower.join("etc-passwd"), "lower").expect("file");
        std::fs::write(upper.join("etc-passwd"), "upper").expect("file");
        // An absolute symlink must resolve inside the image, never on the host.
        std::os::unix::fs::symlink("/srv/app", upper.join("app")).expect("symlink");
        std::os::unix::fs::symlink("../../etc", lower.join("srv/escape")).expect("symlink");
        let view = RootView::new(vec![upper, lower]);
        assert_eq!(view.read(Path::new("/etc-passwd")).expect("read"), b"upper");
        assert_eq!(
            view.resolve(Path::new("/app/x"), true),
            Path::new("/srv/app/x")
        );
        assert_eq!(view.resolve(Path::new("/app"), false), Path::new("/app"));
        assert_eq!(
            view.resolve(Path::new("/srv/escape"), true),
            Path::new("/etc")
        );
        assert_eq!(view.list(Path::new("/")), ["app", "etc-passwd", "srv"]);
    }

    #[test]
    fn a_symlink_loop_stops() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let only = layer(tmp.path(), "only");
        std::os::unix::fs::symlink("/b", only.join("a")).expect("a");
        std::os::unix::fs::symlink("/a", only.join("b")).expect("b");
        let view = RootView::new(vec![only]);
        let _ = view.resolve(Path::new("/a/x"), true);
    }
}
