//! The Bangla -> English glossary of programming terms that guides `--translate`
//! (`configs/glossary.toml`, design §7 after BanglaForge): the entries whose Bangla term
//! occurs in an instruction go into the prompt that asks the model for a translation, so a
//! small model gets "তালিকা = list" handed to it instead of guessing.
//!
//! File format (see the file's own comments): a `[terms]` table, matched where a word
//! *starts* with the term (Bangla inflects by suffix: তালিকার, তালিকায়), and a
//! `[whole_words]` table for short terms that begin unrelated words (সম "even" / সমস্ত "all").
//! At one position the longest matching term wins, and a match is consumed, so জোড়া "pair"
//! hides জোড় "even" inside জোড়ায়. Terms and instructions are compared after
//! [`normalize_bangla`] with whitespace runs collapsed, so either spelling of ড়/য় matches.
//!
//! Loading is strict, like the data loaders: a TOML error, an unknown table, a non-string
//! value, an empty side, a Bangla key without Bangla letters or a key given twice stops the
//! load with an error naming the file, the line and the key.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::retrieval::normalize_bangla;

/// The glossary shipped in `configs/glossary.toml`, built into the binary.
pub const EMBEDDED_GLOSSARY: &str = include_str!("../../../configs/glossary.toml");
/// Where the shipped glossary lives, relative to the repository root.
pub const DEFAULT_GLOSSARY_PATH: &str = "configs/glossary.toml";

/// One glossary line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlossaryEntry {
    /// The Bangla term as the file writes it.
    pub bn: String,
    pub en: String,
    /// From `[whole_words]`: matches only as a whole word.
    pub whole_word: bool,
    /// 1-based line in the file.
    pub line: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Glossary {
    entries: Vec<GlossaryEntry>,
    /// Each entry's term as matching compares it ([`match_form`]), same order.
    keys: Vec<String>,
}

/// Tables as ordered (key, value) lists, so entries keep file order.
mod ordered {
    use serde::de::{Deserializer, MapAccess, Visitor};
    use std::fmt;
    use toml::Spanned;

    pub type Pairs = Vec<(Spanned<String>, Spanned<String>)>;

    struct PairsVisitor;

    impl<'de> Visitor<'de> for PairsVisitor {
        type Value = Pairs;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a table of \"Bangla term\" = \"English term\" lines")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Pairs, A::Error> {
            let mut out = Vec::new();
            while let Some(kv) = map.next_entry()? {
                out.push(kv);
            }
            Ok(out)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Pairs, D::Error> {
        d.deserialize_map(PairsVisitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default, deserialize_with = "ordered::deserialize")]
    terms: ordered::Pairs,
    #[serde(default, deserialize_with = "ordered::deserialize")]
    whole_words: ordered::Pairs,
}

fn line_of(text: &str, byte: usize) -> usize {
    text[..byte.min(text.len())].matches('\n').count() + 1
}

/// The form terms and instructions are compared in.
fn match_form(s: &str) -> String {
    normalize_bangla(s)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_bangla_letter(c: char) -> bool {
    ('\u{0980}'..='\u{09E5}').contains(&c)
}

impl Glossary {
    /// Reads and checks a glossary file.
    pub fn load(path: &Path) -> Result<Glossary> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the glossary {}", path.display()))?;
        Glossary::parse(&text, &path.display().to_string())
    }

    /// The glossary shipped with rupantor ([`EMBEDDED_GLOSSARY`]).
    pub fn embedded() -> Glossary {
        Glossary::parse(EMBEDDED_GLOSSARY, DEFAULT_GLOSSARY_PATH)
            .expect("the embedded glossary is checked by the tests")
    }

    /// Parses glossary text; `origin` names it in errors (`origin:line: ...`).
    pub fn parse(text: &str, origin: &str) -> Result<Glossary> {
        let raw: RawFile = match toml::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                let line = e.span().map(|s| line_of(text, s.start));
                let msg = e.message().trim_end();
                match line {
                    Some(l) => bail!("{origin}:{l}: {msg}"),
                    None => bail!("{origin}: {msg}"),
                }
            }
        };
        let mut g = Glossary::default();
        let mut seen: HashMap<String, usize> = HashMap::new();
        let tables = [(raw.terms, false), (raw.whole_words, true)];
        for (pairs, whole_word) in tables {
            for (k, v) in pairs {
                let line = line_of(text, k.span().start);
                let bn = k.into_inner();
                let en = v.into_inner();
                let at = |what: &str| format!("{origin}:{line}: key \"{bn}\": {what}");
                if bn.trim().is_empty() {
                    bail!(at("the Bangla term is empty"));
                }
                if !bn.chars().any(is_bangla_letter) {
                    bail!(at("the term has no Bangla letters"));
                }
                if en.trim().is_empty() {
                    bail!(at("the English term is empty"));
                }
                let key = match_form(&bn);
                if let Some(first) = seen.insert(key.clone(), line) {
                    bail!(at(&format!(
                        "the same term as on line {first} (spellings are compared normalized)"
                    )));
                }
                g.entries.push(GlossaryEntry {
                    bn,
                    en: en.trim().to_string(),
                    whole_word,
                    line,
                });
                g.keys.push(key);
            }
        }
        Ok(g)
    }

    pub fn entries(&self) -> &[GlossaryEntry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries whose term occurs in `text`, in order of first occurrence, each once.
    /// A term matches at the start of a Bangla word (and for `whole_words` also ends one);
    /// at each position the longest matching term is taken and the text it covers skipped.
    pub fn matches(&self, text: &str) -> Vec<&GlossaryEntry> {
        let text = match_form(text);
        let mut found: Vec<usize> = Vec::new();
        let mut pos = 0;
        while pos < text.len() {
            let rest = &text[pos..];
            let at_word_start = !text[..pos]
                .chars()
                .next_back()
                .is_some_and(is_bangla_letter);
            let mut best: Option<usize> = None;
            if at_word_start {
                for (i, key) in self.keys.iter().enumerate() {
                    if !rest.starts_with(key.as_str()) {
                        continue;
                    }
                    let ends_word = !rest[key.len()..]
                        .chars()
                        .next()
                        .is_some_and(is_bangla_letter);
                    if self.entries[i].whole_word && !ends_word {
                        continue;
                    }
                    if best.is_none_or(|b| key.len() > self.keys[b].len()) {
                        best = Some(i);
                    }
                }
            }
            match best {
                Some(i) => {
                    if !found.contains(&i) {
                        found.push(i);
                    }
                    pos += self.keys[i].len();
                }
                None => pos += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        found.into_iter().map(|i| &self.entries[i]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = "# a comment\n[terms]\n\"তালিকা\" = \"list\"\n\"জোড়\" = \"even\"\n\
                         \"জোড়া\" = \"pair\"\n\"বড় হাতের\" = \"uppercase\"\n\n\
                         [whole_words]\n\"সম\" = \"even\"\n";

    fn bn(entries: &[&GlossaryEntry]) -> Vec<String> {
        entries.iter().map(|e| e.bn.clone()).collect()
    }

    #[test]
    fn matches_inflections_longest_first_and_whole_words() {
        let g = Glossary::parse(SMALL, "small.toml").unwrap();
        assert_eq!(g.len(), 5);
        assert_eq!(g.entries()[1].line, 4);
        assert!(g.entries()[4].whole_word);
        // inflected forms match; the term is listed once, in order of first occurrence
        let m = g.matches("তালিকার জোড় সংখ্যা, আবার তালিকায় জোড় আর বড়  হাতের অক্ষর");
        assert_eq!(bn(&m), ["তালিকা", "জোড়", "বড় হাতের"]);
        // জোড়া (pair) hides জোড় (even) in জোড়ায়
        assert_eq!(bn(&g.matches("জোড়ায় জোড়ায়")), ["জোড়া"]);
        // সম only as a whole word: not in সমস্ত or সমান
        assert!(g.matches("সমস্ত সমান").is_empty());
        assert_eq!(bn(&g.matches("সমস্ত সম সংখ্যা।")), ["সম"]);
        // not inside a word
        assert!(g.matches("অতালিকা").is_empty());
        // a precomposed ড় (U+09DC) in the text matches the decomposed term
        assert_eq!(bn(&g.matches("জো\u{09DC} সংখ্যা")), ["জোড়"]);
        assert_eq!(g.matches("জো\u{09DC} সংখ্যা")[0].en, "even");
    }

    fn err(text: &str) -> String {
        Glossary::parse(text, "g.toml").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = err("[terms]\n\"তালিকা\" = \"list\"\n\"list\" = \"x\"\n");
        assert!(
            e.contains("g.toml:3: key \"list\"") && e.contains("no Bangla"),
            "{e}"
        );
        let e = err("[terms]\n\"তালিকা\" = \"\"\n");
        assert!(
            e.contains("g.toml:2: key \"তালিকা\": the English term is empty"),
            "{e}"
        );
        let e = err("[terms]\n\"জোড়\" = \"even\"\n\n[whole_words]\n\"জো\u{09DC}\" = \"even\"\n");
        assert!(e.contains("g.toml:5: key") && e.contains("line 2"), "{e}");
        let e = err("[terms]\n\"তালিকা\" = 3\n");
        assert!(e.starts_with("g.toml:2:"), "{e}");
        let e = err("[term]\n\"তালিকা\" = \"list\"\n");
        assert!(e.starts_with("g.toml:1:") && e.contains("term"), "{e}");
        let e = err("[terms]\n\"তালিকা\" = \"list\"\n\"তালিকা\" = \"list\"\n");
        assert!(e.starts_with("g.toml:3"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.toml");
        let e = Glossary::load(&path).unwrap_err().to_string();
        assert!(e.contains("missing.toml"), "{e}");
    }

    #[test]
    fn the_shipped_glossary_loads_and_covers_the_common_terms() {
        let g = Glossary::embedded();
        assert!(g.len() >= 40, "{}", g.len());
        let from_disk = Glossary::load(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(DEFAULT_GLOSSARY_PATH),
        )
        .unwrap();
        assert_eq!(from_disk.entries(), g.entries());
        let en =
            |text: &str| -> Vec<String> { g.matches(text).iter().map(|e| e.en.clone()).collect() };
        assert_eq!(
            en("একটি প্রদত্ত তালিকার প্রথম সম সংখ্যা এবং অদ্ভুত সংখ্যার গুণফল খুঁজে বের করুন।"),
            ["list", "first", "even", "number", "odd", "product"]
        );
        assert_eq!(
            en("দুটি সংখ্যার গসাগু ও লসাগু"),
            {
                [
                    "number",
                    "GCD (greatest common divisor)",
                    "LCM (least common multiple)",
                ]
            }
        );
        assert_eq!(
            en("হিপ ক্যু অ্যালগরিদম ব্যবহার করে টুপলগুলির যোগফল"),
            ["heap queue (heapq)", "tuple", "sum"]
        );
    }
}
