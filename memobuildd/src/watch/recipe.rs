//! What a prebuild repeats: a workspace's last build request as a user made it, without its
//! outputs (`-o`) and without a push, persisted with the workspace.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Versions [`BuildRecipe::to_bytes`].
const RECIPE_FORMAT: &[u8] = b"memobuild-recipe-v1\0";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecipe {
    pub dockerfile: PathBuf,
    pub build_args: Vec<(String, String)>,
    pub target: Option<String>,
    /// Tags in the daemon's image store (never pushed).
    pub tags: Vec<String>,
    pub host_network: bool,
    pub source_date_epoch: Option<i64>,
    /// Who asked for the build: a prebuild reads only what they could.
    pub uid: u32,
    pub gid: u32,
}

impl BuildRecipe {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = RECIPE_FORMAT.to_vec();
        // Encoding plain owned data into a Vec cannot fail.
        out.extend(postcard::to_stdvec(self).unwrap_or_default());
        out
    }

    /// `None` for bytes of another format version (the next build records it again).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        postcard::from_bytes(bytes.strip_prefix(RECIPE_FORMAT)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipe_reads_back_and_other_formats_do_not() {
        let recipe = BuildRecipe {
            dockerfile: "/w/Dockerfile".into(),
            build_args: vec![("V".into(), "1".into())],
            target: Some("app".into()),
            tags: vec!["app:dev".into()],
            host_network: true,
            source_date_epoch: None,
            uid: 1000,
            gid: 100,
        };
        assert_eq!(BuildRecipe::from_bytes(&recipe.to_bytes()), Some(recipe));
        assert_eq!(BuildRecipe::from_bytes(b"memobuild-recipe-v0\0x"), None);
    }
}
