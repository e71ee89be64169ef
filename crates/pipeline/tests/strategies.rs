//! The inference strategies' control flow with a scripted stub model (a byte-level Gemma
//! tokenizer, the real sandbox): who enters repair, when it stops, how many rounds, which review
//! rewrites are kept, what the few-shot, translation and repair prompts hold. The stub
//! answers by stage and by the problem in the prompt's last user turn.

use rupantor_data::Problem;
use rupantor_exec::VerdictClass;
use rupantor_model::{GgufVocab, Tokenizer};
use rupantor_pipeline::generate::prompts;
use rupantor_pipeline::prompts::class_hint;
use rupantor_pipeline::{
    run_strategies, ExamplePool, GenSettings, GenStage, Glossary, Produced, ReviewOutcome,
    ScriptedGenerator, Solved, Strategies, StrategyItem, StrategyJob, StrategyRun, VerifySettings,
};

/// A byte-level Gemma-style tokenizer: the chat control tokens, `\n`, `▁` and all 256 byte
/// tokens, so every prompt decodes back to its exact text (the tiny model's vocabulary
/// lacks some capitals).
fn tokenizer() -> Tokenizer {
    let mut tokens: Vec<String> = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
        "\n",
    ]
    .map(String::from)
    .to_vec();
    let mut types = vec![3, 3, 3, 2, 3, 3, 4];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    tokens.push("\u{2581}".into());
    types.push(1);
    Tokenizer::from_gguf_vocab(GgufVocab {
        model: "llama".into(),
        scores: vec![0.0; tokens.len()],
        tokens,
        types,
        bos: Some(2),
        eos: Some(1),
        pad: Some(0),
        unk: Some(3),
        ..Default::default()
    })
    .unwrap()
}

/// The sandbox, or `None` (and a note) where it cannot run programs.
fn sandbox() -> Option<VerifySettings> {
    let v = VerifySettings {
        timeout_s: 5.0,
        workers: 2,
        ..VerifySettings::default()
    };
    match v.ensure_usable() {
        Ok(()) => Some(v),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

fn settings() -> GenSettings {
    GenSettings {
        progress: false,
        ..GenSettings::default()
    }
}

fn problem(id: u64, name: &str, what: &str, tests: &[&str]) -> Problem {
    Problem {
        id,
        instruction: format!("একটি ফাংশন লিখুন যা {what}।\nExample:\n{name}(x)"),
        test_list: tests.iter().map(|t| t.to_string()).collect(),
        response: None,
    }
}

fn dev() -> Vec<Problem> {
    vec![
        problem(
            1,
            "inc",
            "একটি সংখ্যার সাথে এক যোগ করে",
            &[
                "assert inc(1) == 2",
                "assert inc(2) == 3",
                "assert inc(0) == 1",
            ],
        ),
        problem(
            2,
            "double",
            "একটি সংখ্যার দ্বিগুণ ফেরত দেয়",
            &[
                "assert double(2) == 4",
                "assert double(3) == 6",
                "assert double(0) == 0",
            ],
        ),
        problem(
            3,
            "neg",
            "একটি সংখ্যার ঋণাত্মক মান ফেরত দেয়",
            &[
                "assert neg(1) == -1",
                "assert neg(2) == -2",
                "assert neg(0) == 0",
            ],
        ),
    ]
}

/// The content of the last user turn of a prompt text.
fn last_user(prompt: &str) -> &str {
    let at = prompt.rfind("<start_of_turn>user\n").expect("a user turn");
    &prompt[at..]
}

/// Which problem a turn is about, by the function name in its instruction.
fn which(turn: &str) -> &'static str {
    for name in ["inc", "double", "neg", "square"] {
        if turn.contains(&format!("Example:\n{name}(x)")) {
            return name;
        }
    }
    panic!("no known problem in {turn}")
}

fn fenced(code: &str) -> String {
    format!("```python\n{code}\n```")
}

fn job<'a>(
    problems: &'a [Problem],
    strategies: &'a Strategies,
    generation: &'a GenSettings,
    sandbox: &'a VerifySettings,
) -> StrategyJob<'a> {
    StrategyJob {
        split: "dev",
        problems,
        strategies,
        generation,
        sandbox,
        examples: None,
        glossary: None,
        score_visible: false,
    }
}

fn item(run: &StrategyRun, id: u64) -> &StrategyItem {
    run.items.iter().find(|i| i.output.id == id).unwrap()
}

#[test]
fn only_failing_items_are_repaired_until_their_first_pass_and_at_most_n_rounds() {
    let Some(sb) = sandbox() else { return };
    let problems = dev();
    let s = settings();
    let st = Strategies {
        repair: 3,
        ..Strategies::default()
    };
    let mut gen = ScriptedGenerator::new(tokenizer(), |stage: GenStage, prompt: &str| {
        let turn = last_user(prompt);
        let code = match (stage, which(turn)) {
            (GenStage::Main, "inc") => "def inc(x):\n    return x + 1",
            (GenStage::Main, "double") => "def double(x):\n    return x + 1",
            (GenStage::Main, "neg") => "def neg(x)\n    return -x",
            (GenStage::Repair(1), "double") => "def double(x):\n    return 2 * x",
            (GenStage::Repair(_), "neg") => "def neg(x):\n    return minus(x)",
            other => panic!("unexpected {other:?}"),
        };
        fenced(code)
    });
    let run = run_strategies(&mut gen, &job(&problems, &st, &s, &sb)).unwrap();

    // inc passed at once: never in a repair prompt
    let stages: Vec<GenStage> = gen.calls.iter().map(|c| c.0).collect();
    assert_eq!(
        stages,
        [
            GenStage::Main,
            GenStage::Repair(1),
            GenStage::Repair(2),
            GenStage::Repair(3)
        ]
    );
    let per_round: Vec<Vec<&str>> = gen.calls[1..]
        .iter()
        .map(|(_, ps)| ps.iter().map(|p| which(last_user(p))).collect())
        .collect();
    assert_eq!(per_round, [vec!["double", "neg"], vec!["neg"], vec!["neg"]]);

    let inc = item(&run, 1);
    assert_eq!((inc.produced_by, inc.repair_rounds), (Produced::Main, 0));
    assert!(inc.visible.as_ref().unwrap().passed);
    let double = item(&run, 2);
    assert_eq!(
        (double.produced_by, double.repair_rounds),
        (Produced::Repair, 1)
    );
    assert_eq!(double.output.response, "def double(x):\n    return 2 * x");
    assert!(double.visible.as_ref().unwrap().passed);
    let neg = item(&run, 3);
    assert_eq!((neg.produced_by, neg.repair_rounds), (Produced::Repair, 3));
    assert_eq!(neg.visible.as_ref().unwrap().class, VerdictClass::Name);

    let st = &run.stats;
    assert_eq!(
        (st.entered_repair, st.repaired, st.repair_rounds),
        (2, 1, 3)
    );
    assert_eq!(st.repair.prompts, 4);
    assert_eq!(st.visible_before.as_ref().unwrap().passed, 1);
    assert_eq!(st.visible.as_ref().unwrap().passed, 2);
    assert_eq!(run.visible_score().unwrap().n, 3);
    assert_eq!(st.sandbox_runs, 3 + 2 + 1 + 1);
    assert_eq!(run.outputs().len(), 3);
    assert_eq!(run.generated().tokens, st.tokens());

    // the first repair prompt of neg: its code, the syntax class and hint, the trace, and on
    // dev only the first assert
    let first_neg = gen.calls[1]
        .1
        .iter()
        .find(|p| which(last_user(p)) == "neg")
        .unwrap();
    assert!(
        first_neg.contains("def neg(x)\n    return -x"),
        "{first_neg}"
    );
    assert!(
        first_neg.contains(class_hint(VerdictClass::Syntax)),
        "{first_neg}"
    );
    assert!(first_neg.contains("SyntaxError"), "{first_neg}");
    assert!(first_neg.contains("assert neg(1) == -1"), "{first_neg}");
    assert!(
        !first_neg.contains("assert neg(2)") && !first_neg.contains("assert neg(0)"),
        "{first_neg}"
    );
    // the second round is about the second program and its NameError
    let second = &gen.calls[2].1[0];
    assert!(second.contains("return minus(x)") && second.contains("NameError"));
    assert!(second.contains(class_hint(VerdictClass::Name)));
}

#[test]
fn dev_repair_judges_on_the_first_assert_unless_all_are_exposed() {
    let Some(sb) = sandbox() else { return };
    let problems = dev();
    let s = settings();
    // x * x passes double(2) == 4 (the first assert) and fails double(3) == 6
    let script = |stage: GenStage, prompt: &str| {
        let code = match (stage, which(last_user(prompt))) {
            (GenStage::Main, "double") => "def double(x):\n    return x * x",
            (GenStage::Main, "inc") => "def inc(x):\n    return x + 1",
            (GenStage::Main, "neg") => "def neg(x):\n    return -x",
            (GenStage::Repair(_), "double") => "def double(x):\n    return x + x",
            other => panic!("unexpected {other:?}"),
        };
        fenced(code)
    };
    let first_only = Strategies {
        repair: 2,
        ..Strategies::default()
    };
    let mut gen = ScriptedGenerator::new(tokenizer(), script);
    let run = run_strategies(&mut gen, &job(&problems, &first_only, &s, &sb)).unwrap();
    assert_eq!(gen.calls.len(), 1, "everything passes its first assert");
    assert_eq!(run.stats.entered_repair, 0);
    assert_eq!(
        item(&run, 2).output.response,
        "def double(x):\n    return x * x"
    );

    let all = Strategies {
        repair: 2,
        repair_on_all_dev_asserts: true,
        ..Strategies::default()
    };
    let mut gen = ScriptedGenerator::new(tokenizer(), script);
    let run = run_strategies(&mut gen, &job(&problems, &all, &s, &sb)).unwrap();
    assert_eq!(gen.calls.len(), 2);
    let p = &gen.prompts_of(GenStage::Repair(1))[0];
    assert!(p.contains("assert double(2) == 4\nassert double(3) == 6\nassert double(0) == 0"));
    assert!(p.contains(class_hint(VerdictClass::Assertion)));
    assert_eq!(
        item(&run, 2).output.response,
        "def double(x):\n    return x + x"
    );
    assert_eq!(run.stats.repaired, 1);
}

#[test]
fn review_rewrites_are_kept_only_when_they_still_pass() {
    let Some(sb) = sandbox() else { return };
    let mut problems = dev();
    problems.push(problem(
        4,
        "square",
        "একটি সংখ্যার বর্গ ফেরত দেয়",
        &["assert square(3) == 9"],
    ));
    let s = settings();
    let st = Strategies {
        review: true,
        ..Strategies::default()
    };
    let mut gen = ScriptedGenerator::new(tokenizer(), |stage: GenStage, prompt: &str| {
        let code = match (stage, which(last_user(prompt))) {
            (GenStage::Main, "inc") => "def inc(x):\n    return x + 1",
            (GenStage::Main, "double") => "def double(x):\n    return 2 * x",
            (GenStage::Main, "neg") => "def neg(x):\n    return x",
            (GenStage::Main, "square") => "def square(x):\n    return x * x",
            // breaks it: rejected
            (GenStage::Review, "inc") => "def inc(x):\n    return x + 2",
            // a passing rewrite: kept
            (GenStage::Review, "double") => "def double(x):\n    return x + x",
            // the same program, layout aside: unchanged
            (GenStage::Review, "square") => "def square(x):   \n\n    return x * x\n",
            other => panic!("unexpected {other:?}"),
        };
        fenced(code)
    });
    let run = run_strategies(&mut gen, &job(&problems, &st, &s, &sb)).unwrap();
    let reviewed: Vec<&str> = gen
        .prompts_of(GenStage::Review)
        .iter()
        .map(|p| which(last_user(p)))
        .collect();
    assert_eq!(
        reviewed,
        ["inc", "double", "square"],
        "failing neg is not reviewed"
    );
    let inc = item(&run, 1);
    assert_eq!(inc.review, Some(ReviewOutcome::Rejected));
    assert_eq!(inc.output.response, "def inc(x):\n    return x + 1");
    assert_eq!(inc.produced_by, Produced::Main);
    assert!(inc.visible.as_ref().unwrap().passed);
    let double = item(&run, 2);
    assert_eq!(double.review, Some(ReviewOutcome::Kept));
    assert_eq!(double.produced_by, Produced::Review);
    assert_eq!(double.output.response, "def double(x):\n    return x + x");
    assert_eq!(item(&run, 3).review, None);
    assert_eq!(item(&run, 4).review, Some(ReviewOutcome::Unchanged));
    let st = &run.stats;
    assert_eq!(
        (
            st.reviewed,
            st.review_kept,
            st.review_rejected,
            st.review_unchanged
        ),
        (3, 1, 1, 1)
    );
    // main (4) + the two rewrites; the unchanged one never ran again
    assert_eq!(st.sandbox_runs, 6);
    assert_eq!(st.visible.as_ref().unwrap().passed, 3);
}

fn solved(split: &str, id: u64, instruction: &str, response: &str) -> Solved {
    Solved {
        split: split.into(),
        id,
        instruction: instruction.into(),
        test_list: vec![format!("assert {response:?} != ''")],
        response: response.into(),
    }
}

#[test]
fn fewshot_turns_are_the_nearest_solved_problems_never_the_problem_itself() {
    let Some(sb) = sandbox() else { return };
    let problems = dev();
    let pool = ExamplePool::new(vec![
        // dev problem 2 folded by an earlier iteration: must not be its own example
        solved("dev", 2, &problems[1].instruction, "SELF_BY_ID"),
        // the same instruction as dev 3 under another split and id: not its example either
        solved("trial", 40, &problems[2].instruction, "SELF_BY_TEXT"),
        solved(
            "trial",
            1,
            "একটি ফাংশন লিখুন যা একটি সংখ্যার সাথে দুই যোগ করে।\nExample:\nadd_two(x)",
            "ADD_TWO",
        ),
        solved(
            "trial",
            2,
            "একটি ফাংশন লিখুন যা একটি তালিকা উল্টে দেয়।\nExample:\nrev(xs)",
            "REV",
        ),
        solved(
            "trial",
            3,
            "একটি ফাংশন লিখুন যা একটি সংখ্যার দ্বিগুণ ও তিনগুণের যোগফল দেয়।\nExample:\nsum3(x)",
            "SUM3",
        ),
    ]);
    let s = settings();
    let st = Strategies {
        fewshot: 2,
        ..Strategies::default()
    };
    let mut job = job(&problems, &st, &s, &sb);
    job.examples = Some(&pool);
    let mut gen = ScriptedGenerator::new(tokenizer(), |_: GenStage, prompt: &str| {
        fenced(match which(last_user(prompt)) {
            "inc" => "def inc(x):\n    return x + 1",
            "double" => "def double(x):\n    return 2 * x",
            _ => "def neg(x):\n    return -x",
        })
    });
    let run = run_strategies(&mut gen, &job).unwrap();
    for it in &run.items {
        assert_eq!(it.examples.len(), 2, "{it:?}");
        assert!(!it.examples.contains(&("dev".to_string(), it.output.id)));
    }
    assert!(!item(&run, 3).examples.contains(&("trial".to_string(), 40)));
    // inc's nearest is "add two" (সংখ্যার সাথে ... যোগ করে)
    assert_eq!(item(&run, 1).examples[0], ("trial".to_string(), 1));
    let prompts = gen.prompts_of(GenStage::Main);
    assert_eq!(prompts.len(), 3);
    for (p, prob) in prompts.iter().zip(&problems) {
        assert_eq!(p.matches("<start_of_turn>user\n").count(), 3, "{p}");
        assert_eq!(p.matches("<start_of_turn>model\n").count(), 3, "{p}");
        assert_eq!(p.matches(&prob.instruction).count(), 1, "{p}");
        // its own pool entries never show; the other problems' may
        let own = match prob.id {
            2 => "SELF_BY_ID",
            3 => "SELF_BY_TEXT",
            _ => "no such program",
        };
        assert!(!p.contains(own), "{p}");
        assert!(p.ends_with("<start_of_turn>model\n"));
    }
    // examples are earlier turns: their program as the model's answer
    assert!(prompts[0].contains("<start_of_turn>model\nADD_TWO<end_of_turn>\n"));
    assert_eq!(run.stats.fewshot_examples, 6);

    // a context too small for examples: they are dropped, farthest first
    let main_len = tokenizer()
        .encode_chat(&problems[0].instruction, s.visible(&problems[0]))
        .len();
    let mut small = ScriptedGenerator::new(tokenizer(), |_: GenStage, _: &str| String::new());
    small.context_len = Some(main_len + 40 + s.max_new_tokens);
    let one = [problems[0].clone()];
    job.problems = &one;
    let run = run_strategies(&mut small, &job).unwrap();
    assert!(run.items[0].examples.len() < 2);
    assert_eq!(run.stats.fewshot_dropped, 2 - run.items[0].examples.len());
    // without a pool, few-shot is refused before anything is generated
    job.examples = None;
    let mut gen = ScriptedGenerator::new(tokenizer(), |_: GenStage, _: &str| String::new());
    assert!(run_strategies(&mut gen, &job).is_err());
    assert!(gen.calls.is_empty());
}

#[test]
fn translations_go_beside_the_bangla_with_the_glossary_in_their_prompt() {
    let Some(sb) = sandbox() else { return };
    let problems = vec![problem(
        5,
        "inc",
        "একটি তালিকার প্রতিটি জোড় সংখ্যার সাথে এক যোগ করে",
        &["assert inc(1) == 2"],
    )];
    let s = settings();
    let st = Strategies {
        translate: true,
        ..Strategies::default()
    };
    let mut gen = ScriptedGenerator::new(tokenizer(), |stage: GenStage, _: &str| match stage {
        GenStage::Translate => "English translation: Add one to each even number of a list.".into(),
        _ => fenced("def inc(x):\n    return x + 1"),
    });
    let glossary = Glossary::embedded();
    let mut job = job(&problems, &st, &s, &sb);
    job.glossary = Some(&glossary);
    let run = run_strategies(&mut gen, &job).unwrap();
    let tp = &gen.prompts_of(GenStage::Translate)[0];
    assert!(
        tp.contains("- তালিকা: list\n") && tp.contains("- জোড়: even\n"),
        "{tp}"
    );
    assert!(tp.contains(&problems[0].instruction), "{tp}");
    let mp = &gen.prompts_of(GenStage::Main)[0];
    assert!(
        mp.contains("Example:\ninc(x)\n\nEnglish translation:\nAdd one to each even number of a list.\n\nYour code should pass these tests:\nassert inc(1) == 2"),
        "{mp}"
    );
    assert_eq!(
        run.items[0].translation.as_deref(),
        Some("Add one to each even number of a list.")
    );
    assert_eq!(run.stats.translated, 1);
    assert!(
        run.items[0].visible.is_none(),
        "nothing asked for the sandbox"
    );
}

#[test]
fn plain_is_generate_programs_prompts_and_visible_scoring_is_optional() {
    let problems = dev();
    let s = GenSettings {
        max_visible_tests: Some(1),
        ..settings()
    };
    let st = Strategies::default();
    assert!(st.is_plain());
    assert_eq!(st.describe(), "plain");
    let sb = VerifySettings::default();
    let mut gen = ScriptedGenerator::new(tokenizer(), |_: GenStage, _: &str| "x = 1".into());
    let run = run_strategies(&mut gen, &job(&problems, &st, &s, &sb)).unwrap();
    let tok = tokenizer();
    let want: Vec<String> = prompts(&tok, &problems, &s)
        .iter()
        .map(|ids| tok.decode(ids, false))
        .collect();
    assert_eq!(gen.calls.len(), 1);
    assert_eq!(gen.calls[0].1, want);
    assert!(run.items.iter().all(|i| i.visible.is_none()));
    assert!(run.stats.visible.is_none());

    let Some(sb) = sandbox() else { return };
    let mut j = job(&problems, &st, &s, &sb);
    j.score_visible = true;
    let mut gen = ScriptedGenerator::new(tokenizer(), |_: GenStage, prompt: &str| {
        if which(last_user(prompt)) == "inc" {
            "def inc(x):\n    return x + 1".into()
        } else {
            "x = 1".into()
        }
    });
    let run = run_strategies(&mut gen, &j).unwrap();
    let v = run.stats.visible.as_ref().unwrap();
    assert_eq!((v.n, v.passed), (3, 1));
    assert_eq!(run.stats.visible_before, run.stats.visible);
}

#[test]
fn strategies_from_toml_and_descriptions() {
    let st: Strategies = toml::from_str("fewshot = 5\nrepair = 3\nreview = true").unwrap();
    assert_eq!(st.describe(), "fewshot 5 + repair 3 + review");
    assert!(!st.translate && !st.repair_on_all_dev_asserts);
    assert!(toml::from_str::<Strategies>("repairs = 3").is_err());
    assert!(Strategies {
        repair: 99,
        ..Strategies::default()
    }
    .validate()
    .is_err());
    let p = &dev()[0];
    assert_eq!(Strategies::default().visible_asserts(p), &p.test_list[..1]);
    let all = Strategies {
        repair_on_all_dev_asserts: true,
        ..Strategies::default()
    };
    assert_eq!(all.visible_asserts(p), &p.test_list[..]);
}

#[test]
fn the_real_model_path_matches_generate_programs_and_runs_every_stage() {
    use candle_core::Device;
    use rupantor_pipeline::{
        generate_programs, generate_with_strategies, Generator, StrategyGenerator,
    };
    use rupantor_train::{LoraModel, TrainConfig};

    let tiny = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gemma_tiny/gemma2");
    let tok = Tokenizer::from_tokenizer_json(tiny.join("tokenizer.json")).unwrap();
    let spec = TrainConfig {
        rank: 4,
        alpha: 8.0,
        ..TrainConfig::default()
    }
    .lora_spec()
    .unwrap();
    let model = LoraModel::load(&tiny, &Device::Cpu, spec).unwrap();
    let s = GenSettings {
        max_new_tokens: 6,
        batch: 2,
        ..settings()
    };
    let problems = dev();
    let plain = Strategies::default();
    let sb = VerifySettings::default();
    let run =
        generate_with_strategies(model.model(), &tok, &job(&problems, &plain, &s, &sb)).unwrap();
    let want = generate_programs(model.model(), &tok, &problems, &s).unwrap();
    assert_eq!(run.outputs(), want.outputs, "plain is generate_programs");
    assert_eq!(run.stats.main.tokens, want.tokens);

    // every stage on the random model: its junk fails, so all of it goes through repair
    let Some(sb) = sandbox() else { return };
    let pool = ExamplePool::new(vec![solved(
        "trial",
        9,
        "add(a, b)",
        "def add(a, b): return a + b",
    )]);
    let all = Strategies {
        fewshot: 1,
        repair: 1,
        review: true,
        translate: true,
        ..Strategies::default()
    };
    let mut j = job(&problems, &all, &s, &sb);
    j.examples = Some(&pool);
    let run = generate_with_strategies(model.model(), &tok, &j).unwrap();
    let st = &run.stats;
    assert_eq!((st.translate.prompts, st.main.prompts), (3, 3));
    assert_eq!(st.fewshot_examples, 3);
    // the tiny model holds 512 positions: repair prompts (code, trace, Bangla as bytes) that
    // do not fit are left out and counted, never sent
    let failing = 3 - st.visible_before.as_ref().unwrap().passed;
    assert_eq!(st.repair.prompts + st.too_long, failing, "{st:?}");
    assert!(st.repair_rounds <= 1);
    assert_eq!(st.visible.as_ref().unwrap().n, 3);

    // the loop's Generator: the same run, reported as generate_programs reports
    let mut g = StrategyGenerator {
        strategies: Strategies {
            repair: 1,
            ..Strategies::default()
        },
        split: "dev".into(),
        sandbox: sb,
        examples: None,
        glossary: None,
        runs: Vec::new(),
    };
    let generated = g.generate(1, &model, &tok, &problems, &s).unwrap();
    assert_eq!(generated.outputs.len(), 3);
    assert_eq!(g.runs.len(), 1);
    assert_eq!(generated.outputs, g.runs[0].1.outputs());
}
