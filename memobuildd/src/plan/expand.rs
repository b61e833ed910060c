//! Word expansion of whole instructions, remembering which variables each one used.

use std::collections::BTreeMap;

use crate::frontend::shell::{self, Env, ExpandError};
use crate::frontend::{FileCopy, Heredoc, InstructionKind};

/// Expands the words of one instruction, remembering which variables they used.
pub(super) struct Expander<'e> {
    env: &'e dyn Env,
    escape: char,
    used: BTreeMap<String, String>,
}

impl<'e> Expander<'e> {
    pub(super) fn new(env: &'e dyn Env, escape: char) -> Self {
        Expander {
            env,
            escape,
            used: BTreeMap::new(),
        }
    }

    fn expansion(&mut self, text: &str) -> Result<shell::Expansion, ExpandError> {
        let expansion = shell::expand(text, self.env, self.escape)?;
        self.note(&expansion);
        Ok(expansion)
    }

    /// Remembers the set variables `expansion` referred to.
    fn note(&mut self, expansion: &shell::Expansion) {
        for name in &expansion.referenced {
            if let Some(value) = self.env.lookup(name) {
                self.used.insert(name.clone(), value.to_owned());
            }
        }
    }

    /// Heredoc bodies with an unquoted delimiter, expanded; the others as written.
    fn heredocs(&mut self, docs: &[Heredoc]) -> Result<Vec<Heredoc>, ExpandError> {
        let mut expanded = docs.to_vec();
        for doc in expanded.iter_mut().filter(|d| d.expand) {
            let expansion = shell::expand_heredoc(&doc.body, self.env)?;
            self.note(&expansion);
            doc.body = expansion.word;
        }
        Ok(expanded)
    }

    pub(super) fn word(&mut self, text: &str) -> Result<String, ExpandError> {
        Ok(self.expansion(text)?.word)
    }

    pub(super) fn opt(&mut self, text: Option<&str>) -> Result<Option<String>, ExpandError> {
        text.map(|t| self.word(t)).transpose()
    }

    fn all(&mut self, texts: &[String]) -> Result<Vec<String>, ExpandError> {
        texts.iter().map(|t| self.word(t)).collect()
    }

    /// The variables the expansions so far used, with the values they had.
    pub(super) fn used(&self) -> Vec<(String, String)> {
        self.used
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// `kind` with its expandable words expanded. RUN, CMD, ENTRYPOINT, SHELL, HEALTHCHECK,
    /// MAINTAINER and ONBUILD are left as written: their shell (or the child build) expands.
    pub(super) fn instruction(
        &mut self,
        kind: &InstructionKind,
    ) -> Result<InstructionKind, ExpandError> {
        Ok(match kind {
            InstructionKind::Copy(copy) => InstructionKind::Copy(self.file_copy(copy)?),
            InstructionKind::Add(copy) => InstructionKind::Add(self.file_copy(copy)?),
            InstructionKind::Env(pairs) => InstructionKind::Env(self.pairs(pairs)?),
            InstructionKind::Label(pairs) => InstructionKind::Label(self.pairs(pairs)?),
            InstructionKind::Expose(ports) => {
                let mut split = Vec::new();
                for port in ports {
                    split.extend(self.expansion(port)?.words);
                }
                // The image config holds a set of ports: order and repeats mean nothing.
                split.sort();
                split.dedup();
                InstructionKind::Expose(split)
            }
            InstructionKind::Volume(paths) => InstructionKind::Volume(self.all(paths)?),
            InstructionKind::User(user) => InstructionKind::User(self.word(user)?),
            InstructionKind::Workdir(dir) => InstructionKind::Workdir(self.word(dir)?),
            InstructionKind::StopSignal(sig) => InstructionKind::StopSignal(self.word(sig)?),
            InstructionKind::Run(run) => {
                let mut run = run.clone();
                run.mounts = self.all(&run.mounts)?;
                InstructionKind::Run(run)
            }
            other => other.clone(),
        })
    }

    fn file_copy(&mut self, copy: &FileCopy) -> Result<FileCopy, ExpandError> {
        Ok(FileCopy {
            sources: self.all(&copy.sources)?,
            dest: self.word(&copy.dest)?,
            heredocs: self.heredocs(&copy.heredocs)?,
            // Resolved against the global ARGs when the step is lowered.
            from: copy.from.clone(),
            chown: self.opt(copy.chown.as_deref())?,
            chmod: self.opt(copy.chmod.as_deref())?,
            link: copy.link,
            parents: copy.parents,
            exclude: self.all(&copy.exclude)?,
            checksum: self.opt(copy.checksum.as_deref())?,
            keep_git_dir: copy.keep_git_dir,
        })
    }

    fn pairs(&mut self, pairs: &[(String, String)]) -> Result<Vec<(String, String)>, ExpandError> {
        pairs
            .iter()
            .map(|(k, v)| Ok((self.word(k)?, self.word(v)?)))
            .collect()
    }
}
