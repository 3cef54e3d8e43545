//! Unknown keys: found while deserialising (instead of failing there, so
//! `check` can report them alongside every other problem) and located in the
//! file for a line number.

use toml::de::{DeTable, DeValue};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// `serde_ignored`'s path as steps, outermost first.
pub fn steps(path: &serde_ignored::Path<'_>) -> Vec<Step> {
    let mut steps = match path {
        serde_ignored::Path::Root => return Vec::new(),
        serde_ignored::Path::Seq { parent, .. }
        | serde_ignored::Path::Map { parent, .. }
        | serde_ignored::Path::Some { parent }
        | serde_ignored::Path::NewtypeStruct { parent }
        | serde_ignored::Path::NewtypeVariant { parent } => steps(parent),
    };
    match path {
        serde_ignored::Path::Seq { index, .. } => steps.push(Step::Index(*index)),
        serde_ignored::Path::Map { key, .. } => steps.push(Step::Key(key.clone())),
        _ => {}
    }
    steps
}

/// `route[0].auth.token_qurey`, as the rest of `check`'s messages write paths.
pub fn display(steps: &[Step]) -> String {
    let mut text = String::new();
    for step in steps {
        match step {
            Step::Key(key) if text.is_empty() => text.push_str(key),
            Step::Key(key) => {
                text.push('.');
                text.push_str(key);
            }
            Step::Index(index) => text.push_str(&format!("[{index}]")),
        }
    }
    text
}

/// 1-based line of the last key in `steps`, if the document can be walked to it.
pub fn line_of(text: &str, steps: &[Step]) -> Option<usize> {
    let root = DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut value: Option<&DeValue<'_>> = None;
    let mut offset = None;
    for step in steps {
        match (step, value) {
            (Step::Key(key), None | Some(DeValue::Table(_))) => {
                if let Some(DeValue::Table(inner)) = value {
                    table = inner;
                }
                let (name, found) = table.iter().find(|(name, _)| name.get_ref() == key)?;
                offset = Some(name.span().start);
                value = Some(found.get_ref());
            }
            (Step::Index(index), Some(DeValue::Array(items))) => {
                let item = items.get(*index)?;
                offset = Some(item.span().start);
                value = Some(item.get_ref());
            }
            _ => return None,
        }
    }
    offset.map(|at| line_at(text, at))
}

/// 1-based line of byte `offset` in `text`.
pub fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_in_arrays_of_tables() {
        let text = "[[route]]\npath = \"/a\"\n\n[[route]]\npath = \"/b\"\n[route.auth]\ntoken_qurey = \"t\"\n";
        let steps = vec![
            Step::Key("route".into()),
            Step::Index(1),
            Step::Key("auth".into()),
            Step::Key("token_qurey".into()),
        ];
        assert_eq!(display(&steps), "route[1].auth.token_qurey");
        assert_eq!(line_of(text, &steps), Some(7));
    }
}
