//! TF-IDF retrieval of solved problems as few-shot examples (design §7, BanglaForge's RAG).
//!
//! The texts mix Bangla prose with code (`Example:\nmax_chain_length(lst, n)`), so the
//! tokenizer knows both:
//!
//! * a Bangla word is a run of the Bengali block's letters *and* its combining signs
//!   (vowel signs, virama, nukta, candrabindu, anusvara, ...), so `যোগফল` and `জোড়` stay one
//!   word each; precomposed nukta letters (`ড়` U+09DC, `ঢ়`, `য়`) and split two-part vowel
//!   signs are brought to one spelling first, ZWJ/ZWNJ are dropped without splitting;
//! * Bangla digits count as ASCII digits (`১২` is `12`);
//! * a code identifier is split at `_`, camelCase humps and letter/digit changes, every part
//!   lowercased; the whole identifier (lowercased) is kept too when it had several parts, so
//!   `maxChainLength` and `max_chain_length` share `max`, `chain`, `length` and each keeps a
//!   rare term of its own.
//!
//! Features are the unigrams and the bigrams of adjacent parts (whole identifiers are
//! unigrams only), weighted by raw count times smoothed idf `ln((1 + n) / (1 + df)) + 1` and
//! l2-normalized (scikit-learn's `TfidfVectorizer` defaults), so a similarity is a cosine.
//! Rankings are deterministic: ties go to the lower document index, and every dot product
//! sums in term-id order.

use std::collections::HashMap;

use rupantor_data::Problem;

use crate::pool::PoolEntry;

/// Whether `c` belongs inside a Bangla word: the Bengali block's letters and combining
/// signs (not its digits, currency signs or fractions).
fn is_bangla_word_char(c: char) -> bool {
    matches!(
        c,
        '\u{0980}'..='\u{09E5}' | '\u{09F0}' | '\u{09F1}' | '\u{09FC}' | '\u{09FE}'
    )
}

fn bangla_digit(c: char) -> Option<char> {
    ('\u{09E6}'..='\u{09EF}')
        .contains(&c)
        .then(|| char::from(b'0' + (c as u32 - 0x09E6) as u8))
}

/// One spelling for the Bangla sequences that have two: the precomposed nukta letters
/// become letter + nukta (their NFC form), the two-part vowel signs O and AU become their
/// single code points (also NFC), Bangla digits become ASCII and ZWJ/ZWNJ go.
pub fn normalize_bangla(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{09DC}' => out.push_str("\u{09A1}\u{09BC}"),
            '\u{09DD}' => out.push_str("\u{09A2}\u{09BC}"),
            '\u{09DF}' => out.push_str("\u{09AF}\u{09BC}"),
            '\u{200C}' | '\u{200D}' => {}
            '\u{09C7}' if chars.peek() == Some(&'\u{09BE}') => {
                chars.next();
                out.push('\u{09CB}');
            }
            '\u{09C7}' if chars.peek() == Some(&'\u{09D7}') => {
                chars.next();
                out.push('\u{09CC}');
            }
            c => out.push(bangla_digit(c).unwrap_or(c)),
        }
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Bangla,
    Ident,
    Other,
}

fn class(c: char) -> Class {
    if is_bangla_word_char(c) {
        Class::Bangla
    } else if c.is_alphanumeric() || c == '_' {
        Class::Ident
    } else {
        Class::Other
    }
}

/// The lowercased parts of a code identifier: split at `_`, at a lower->upper change
/// (`maxChain`), before the last capital of a run followed by a lowercase letter
/// (`HTTPServer` -> `http`, `server`) and where letters and digits meet.
pub fn identifier_parts(ident: &str) -> Vec<String> {
    let mut parts = Vec::new();
    for piece in ident.split('_').filter(|p| !p.is_empty()) {
        let chars: Vec<char> = piece.chars().collect();
        let mut start = 0;
        for i in 1..chars.len() {
            let (a, b) = (chars[i - 1], chars[i]);
            let next_lower = chars.get(i + 1).is_some_and(|c| c.is_lowercase());
            let split = (a.is_lowercase() && b.is_uppercase())
                || (a.is_uppercase() && b.is_uppercase() && next_lower)
                || (a.is_numeric() != b.is_numeric());
            if split {
                parts.push(chars[start..i].iter().collect::<String>().to_lowercase());
                start = i;
            }
        }
        parts.push(chars[start..].iter().collect::<String>().to_lowercase());
    }
    parts
}

/// A word of the text: its parts (one for a Bangla word or a number, the identifier parts
/// otherwise) and, for an identifier of several parts, the whole identifier lowercased.
struct Word {
    parts: Vec<String>,
    whole: Option<String>,
}

fn words(text: &str) -> Vec<Word> {
    let text = normalize_bangla(text);
    let mut out = Vec::new();
    let mut run = String::new();
    let mut run_class = Class::Other;
    let mut flush = |run: &mut String, cls: Class| {
        match cls {
            Class::Bangla if !run.is_empty() => out.push(Word {
                parts: vec![run.clone()],
                whole: None,
            }),
            Class::Ident if !run.is_empty() => {
                let parts = identifier_parts(run);
                let whole = (parts.len() > 1).then(|| run.to_lowercase());
                if !parts.is_empty() {
                    out.push(Word { parts, whole });
                }
            }
            _ => {}
        }
        run.clear();
    };
    for c in text.chars() {
        let cls = class(c);
        if cls != run_class {
            flush(&mut run, run_class);
            run_class = cls;
        }
        if cls != Class::Other {
            run.push(c);
        }
    }
    flush(&mut run, run_class);
    out
}

/// The unigrams of `text` in order: Bangla words, numbers and identifier parts, each
/// identifier of several parts followed by the whole identifier.
pub fn tokenize(text: &str) -> Vec<String> {
    words(text)
        .into_iter()
        .flat_map(|w| w.parts.into_iter().chain(w.whole))
        .collect()
}

/// Unigram and bigram counts of `text`.
fn term_counts(text: &str) -> HashMap<String, u32> {
    let words = words(text);
    // bigrams join adjacent parts; whole identifiers are unigrams only
    let stream: Vec<&String> = words.iter().flat_map(|w| &w.parts).collect();
    let mut counts: HashMap<String, u32> = HashMap::new();
    for t in stream
        .iter()
        .copied()
        .chain(words.iter().filter_map(|w| w.whole.as_ref()))
    {
        *counts.entry(t.clone()).or_default() += 1;
    }
    for w in stream.windows(2) {
        *counts.entry(format!("{} {}", w[0], w[1])).or_default() += 1;
    }
    counts
}

/// A TF-IDF index over a fixed set of documents; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct TfIdfIndex {
    vocab: HashMap<String, u32>,
    idf: Vec<f32>,
    /// Per document: (term id, weight), sorted by term id, l2-normalized.
    docs: Vec<Vec<(u32, f32)>>,
}

impl TfIdfIndex {
    pub fn build(docs: &[String]) -> TfIdfIndex {
        let counts: Vec<HashMap<String, u32>> = docs.iter().map(|d| term_counts(d)).collect();
        // term ids in sorted order, so the index does not depend on hash order
        let mut terms: Vec<&String> = counts.iter().flat_map(HashMap::keys).collect();
        terms.sort_unstable();
        terms.dedup();
        let vocab: HashMap<String, u32> = terms
            .iter()
            .enumerate()
            .map(|(i, t)| ((*t).clone(), i as u32))
            .collect();
        let mut df = vec![0u32; vocab.len()];
        for c in &counts {
            for t in c.keys() {
                df[vocab[t] as usize] += 1;
            }
        }
        let n = docs.len() as f64;
        let idf: Vec<f32> = df
            .iter()
            .map(|&d| (((1.0 + n) / (1.0 + f64::from(d))).ln() + 1.0) as f32)
            .collect();
        let mut index = TfIdfIndex {
            vocab,
            idf,
            docs: Vec::new(),
        };
        index.docs = counts.iter().map(|c| index.weigh(c)).collect();
        index
    }

    fn weigh(&self, counts: &HashMap<String, u32>) -> Vec<(u32, f32)> {
        let mut v: Vec<(u32, f32)> = counts
            .iter()
            .filter_map(|(t, &c)| {
                let id = *self.vocab.get(t)?;
                Some((id, c as f32 * self.idf[id as usize]))
            })
            .collect();
        v.sort_unstable_by_key(|&(id, _)| id);
        let norm = v.iter().map(|&(_, w)| w * w).sum::<f32>().sqrt();
        if norm > 0.0 {
            for (_, w) in &mut v {
                *w /= norm;
            }
        }
        v
    }

    /// Number of documents.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// Distinct unigrams and bigrams over all documents.
    pub fn vocab_len(&self) -> usize {
        self.vocab.len()
    }

    /// The l2-normalized TF-IDF vector of `text` over the index's vocabulary (terms the
    /// documents never use are left out), as (term id, weight) sorted by term id.
    pub fn vectorize(&self, text: &str) -> Vec<(u32, f32)> {
        self.weigh(&term_counts(text))
    }

    /// Cosine similarity of every document with `query`, in document order.
    pub fn similarities(&self, query: &str) -> Vec<f32> {
        let q = self.vectorize(query);
        self.docs.iter().map(|d| sparse_dot(&q, d)).collect()
    }

    /// The `k` documents most similar to `query` that `exclude` does not reject, best first
    /// (ties: lower index first), with their cosine similarity. Documents sharing no term
    /// with the query still count (similarity 0), after every better one.
    pub fn nearest(
        &self,
        query: &str,
        k: usize,
        exclude: impl Fn(usize) -> bool,
    ) -> Vec<(usize, f32)> {
        let mut scored: Vec<(usize, f32)> = self
            .similarities(query)
            .into_iter()
            .enumerate()
            .filter(|&(i, _)| !exclude(i))
            .collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored.truncate(k);
        scored
    }
}

fn sparse_dot(a: &[(u32, f32)], b: &[(u32, f32)]) -> f32 {
    let (mut i, mut j, mut s) = (0, 0, 0.0f32);
    while i < a.len() && j < b.len() {
        match a[i].0.cmp(&b[j].0) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                s += a[i].1 * b[j].1;
                i += 1;
                j += 1;
            }
        }
    }
    s
}

/// A solved problem that retrieval can offer as an example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Solved {
    /// The split it comes from (`trial`, `dev`, ...): with `id`, what self-exclusion compares.
    pub split: String,
    pub id: u64,
    pub instruction: String,
    pub test_list: Vec<String>,
    /// Its program.
    pub response: String,
}

/// What an instruction is compared by for self-exclusion: whitespace runs collapsed.
fn instruction_key(s: &str) -> String {
    normalize_bangla(s)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Solved problems indexed by their instructions: the few-shot pool.
#[derive(Debug, Clone, Default)]
pub struct ExamplePool {
    solved: Vec<Solved>,
    keys: Vec<String>,
    index: TfIdfIndex,
}

impl ExamplePool {
    /// Indexes `solved`; entries with a blank response are left out (nothing to show).
    pub fn new(solved: Vec<Solved>) -> ExamplePool {
        let solved: Vec<Solved> = solved
            .into_iter()
            .filter(|s| !s.response.trim().is_empty())
            .collect();
        let docs: Vec<String> = solved.iter().map(|s| s.instruction.clone()).collect();
        ExamplePool {
            keys: solved
                .iter()
                .map(|s| instruction_key(&s.instruction))
                .collect(),
            index: TfIdfIndex::build(&docs),
            solved,
        }
    }

    /// The problems of `split` that carry a reference response (the trial split's).
    pub fn from_problems(split: &str, problems: &[Problem]) -> ExamplePool {
        ExamplePool::new(
            problems
                .iter()
                .filter_map(|p| {
                    Some(Solved {
                        split: split.to_string(),
                        id: p.id,
                        instruction: p.instruction.clone(),
                        test_list: p.test_list.clone(),
                        response: p.response.clone()?,
                    })
                })
                .collect(),
        )
    }

    /// The loop's training pool (trial references and folded dev programs), each entry
    /// under its source split (`trial` / `dev`) and its id in that split.
    pub fn from_pool(entries: &[PoolEntry]) -> ExamplePool {
        ExamplePool::new(
            entries
                .iter()
                .map(|e| Solved {
                    split: e.source.as_str().to_string(),
                    id: e.id,
                    instruction: e.instruction.clone(),
                    test_list: e.test_list.clone(),
                    response: e.response.clone(),
                })
                .collect(),
        )
    }

    pub fn entries(&self) -> &[Solved] {
        &self.solved
    }

    pub fn len(&self) -> usize {
        self.solved.len()
    }

    pub fn is_empty(&self) -> bool {
        self.solved.is_empty()
    }

    /// The `k` solved problems nearest to `problem` (of split `split`) by its instruction,
    /// best first, never the problem itself: not the entry with the same split and id, nor
    /// any entry with the same instruction text (whitespace aside).
    pub fn nearest(&self, split: &str, problem: &Problem, k: usize) -> Vec<(&Solved, f32)> {
        let key = instruction_key(&problem.instruction);
        self.index
            .nearest(&problem.instruction, k, |i| {
                let s = &self.solved[i];
                (s.split == split && s.id == problem.id) || self.keys[i] == key
            })
            .into_iter()
            .map(|(i, score)| (&self.solved[i], score))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bangla_words_keep_their_signs() {
        // যোগফল: য ো গ ফ ল (vowel sign O); জোড়: জ ো ড ় (nukta); বিজোড়: ব ি জ ো ড ়.
        let toks = tokenize("দুটি সংখ্যার যোগফল, জোড় ও বিজোড় সংখ্যা।");
        assert_eq!(toks, ["দুটি", "সংখ্যার", "যোগফল", "জোড়", "ও", "বিজোড়", "সংখ্যা"]);
        // a precomposed ড় (U+09DC) and a split vowel sign (E + AA) spell the same word
        assert_eq!(tokenize("জ\u{09C7}\u{09BE}\u{09DC}"), ["জোড়"]);
        // Bangla digits are numbers; ZWNJ does not split a word
        assert_eq!(tokenize("১২টি র\u{200C}্যাম"), ["12", "টি", "র্যাম"]);
    }

    #[test]
    fn identifiers_split_and_stay_whole() {
        assert_eq!(
            tokenize("maxChainLength(lst, n)"),
            ["max", "chain", "length", "maxchainlength", "lst", "n"]
        );
        assert_eq!(
            tokenize("get_ludic HTTPServer x2"),
            [
                "get",
                "ludic",
                "get_ludic",
                "http",
                "server",
                "httpserver",
                "x",
                "2",
                "x2"
            ]
        );
        assert_eq!(tokenize("ফাংশন first_repeated_char"), {
            ["ফাংশন", "first", "repeated", "char", "first_repeated_char"]
        });
        assert_eq!(identifier_parts("__init__"), ["init"]);
    }

    fn docs() -> Vec<String> {
        [
            "দুটি সংখ্যার যোগফল বের করুন।\nExample:\nadd(a, b)",
            "একটি তালিকার জোড় সংখ্যাগুলি খুঁজুন।\nExample:\nfind_even(lst)",
            "একটি স্ট্রিং উল্টান।\nExample:\nreverse_string(s)",
            "একটি তালিকার বিজোড় সংখ্যাগুলি খুঁজুন।\nExample:\nfind_odd(lst)",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn rare_shared_terms_rank_first_and_ties_go_by_index() {
        let index = TfIdfIndex::build(&docs());
        assert_eq!(index.len(), 4);
        let got = index.nearest("একটি অ্যারের জোড় সংখ্যা find_even", 4, |_| false);
        assert_eq!(got[0].0, 1, "{got:?}");
        assert!(got[0].1 > got[1].1);
        assert_eq!(got[1].0, 3, "shares find and একটি");
        let got = index.nearest("reverseString", 2, |_| false);
        assert_eq!(got[0].0, 2);
        // nothing shared: every score 0, index order
        let got = index.nearest("zzz", 3, |_| false);
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            [0, 1, 2],
            "{got:?}"
        );
        assert!(got.iter().all(|g| g.1 == 0.0));
        // a document is similar to itself with cosine 1
        let sims = index.similarities(&docs()[2]);
        assert!((sims[2] - 1.0).abs() < 1e-5, "{sims:?}");
        // excluded documents never come back
        let got = index.nearest(&docs()[1], 10, |i| i == 1);
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|g| g.0 != 1));
        assert_eq!(got[0].0, 3);
    }

    #[test]
    fn idf_is_smoothed_and_vectors_are_unit_length() {
        let index = TfIdfIndex::build(&docs());
        let v = index.vectorize("একটি তালিকার জোড়");
        let norm: f32 = v.iter().map(|(_, w)| w * w).sum();
        assert!((norm - 1.0).abs() < 1e-5);
        // জোড় (df 1) outweighs একটি (df 3)
        let w = |t: &str| {
            let id = index.vocab[t];
            v.iter().find(|(i, _)| *i == id).unwrap().1
        };
        assert!(w("জোড়") > w("একটি"));
        let want = ((5.0f64 / 2.0).ln() + 1.0) / ((5.0f64 / 4.0).ln() + 1.0);
        assert!((f64::from(w("জোড়") / w("একটি")) - want).abs() < 1e-5);
        assert!(index.vocab.contains_key("তালিকার জোড়"), "bigrams are terms");
        assert!(TfIdfIndex::build(&[]).nearest("x", 3, |_| false).is_empty());
    }

    fn problem(id: u64, instruction: &str, response: Option<&str>) -> Problem {
        Problem {
            id,
            instruction: instruction.into(),
            test_list: vec!["assert True".into()],
            response: response.map(String::from),
        }
    }

    #[test]
    fn a_problem_never_retrieves_itself() {
        let d = docs();
        let trial: Vec<Problem> = d
            .iter()
            .enumerate()
            .map(|(i, t)| problem(i as u64 + 1, t, Some("def f():\n    pass")))
            .chain([problem(9, "no response", None)])
            .collect();
        let pool = ExamplePool::from_problems("trial", &trial);
        assert_eq!(pool.len(), 4, "unsolved problems are not examples");
        // the same split and id: excluded even with another instruction
        let me = problem(2, "একটি তালিকার জোড় সংখ্যাগুলি খুঁজুন find_even", None);
        let got = pool.nearest("trial", &me, 4);
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|(s, _)| s.id != 2));
        // another split with the same id: allowed
        let got = pool.nearest("dev", &me, 1);
        assert_eq!(got[0].0.id, 2);
        // the same instruction (whitespace aside) under another split and id: excluded
        let twin = problem(77, &format!("  {}\n", d[1].replace('\n', " \n ")), None);
        let got = pool.nearest("dev", &twin, 4);
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|(s, _)| s.id != 2));
        assert_eq!(got[0].0.id, 4, "the odd-numbers twin is nearest");
    }
}
