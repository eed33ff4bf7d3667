//! Batch prompting (Cheng et al. 2023, "Batch Prompting: Efficient Inference with Large
//! Language Model APIs"): K questions of a task in one prompt, numbered `Q[1]` to `Q[K]`,
//! answered in one completion as `A[1]: ...` to `A[K]: ...`. The few-shot demonstrations
//! are shown grouped the same way, so they teach the format, and the instruction every
//! prompt of the task starts with is written once per group. The instruction and the
//! demonstrations are then paid once per K questions instead of once per question; the
//! report weighs the prompt tokens saved against the accuracy the grouping costs.

use crate::compress::SEPARATOR;
use crate::error::EvalError;
use crate::metric;
use crate::prompting;
use crate::task::{EvalTask, Expected, Item, Metric, Prompting};

/// Questions one prompt may hold at most.
pub const MAX_PER_PROMPT: usize = 32;

/// Tokens an answer's label (`A[12]: `) and line break take, on top of the task's answer
/// length, when a grouped request's answer length is set.
const LABEL_TOKENS: usize = 8;

/// `task` asked `k` questions to a prompt, after `shots` demonstrations grouped `k` to a
/// block: each item of the result is one prompt whose [`Expected::Batch`] lists its
/// questions' answers in order (the last prompt may hold fewer). A perplexity task, with no
/// questions, comes back as written.
pub fn grouped(task: &EvalTask, shots: usize, k: usize) -> Result<EvalTask, EvalError> {
    if task.metric == Metric::Perplexity {
        return Ok(task.clone());
    }
    let instruction = instruction(task);
    let context = prompting::drawn(task, shots)?
        .chunks(k)
        .map(|group| {
            let questions: Vec<&str> = group.iter().map(|i| i.prompt.as_str()).collect();
            let answers: Vec<String> = group
                .iter()
                .map(|i| {
                    let solved = i.solved().unwrap_or_default();
                    one_line(solved.get(i.prompt.len()..).unwrap_or_default())
                })
                .collect();
            block(&instruction, &questions, Some(&answers))
        })
        .collect::<Vec<_>>()
        .join(SEPARATOR);
    let items = task
        .items
        .chunks(k)
        .map(|group| {
            let questions: Vec<&str> = group.iter().map(|i| i.prompt.as_str()).collect();
            let asked = block(&instruction, &questions, None);
            let prompt = if context.is_empty() {
                asked
            } else {
                format!("{context}{SEPARATOR}{asked}")
            };
            Item {
                prompt,
                expected: Expected::Batch {
                    answers: group.iter().map(|i| i.expected.clone()).collect(),
                    stop: task.stop.clone(),
                },
            }
        })
        .collect();
    let mut t = task.clone();
    t.items = items;
    t.max_tokens = k * (task.max_tokens + LABEL_TOKENS);
    // The answers end where the next group would begin.
    t.stop = vec![SEPARATOR.into(), "\nQ[".into(), format!("A[{}]:", k + 1)];
    t.prompting = Some(Prompting {
        shots,
        rate: None,
        per_prompt: k,
    });
    Ok(t)
}

/// The leading lines every prompt of `task` (held-out and training) starts with: its
/// instruction, written once per group. Empty when the prompts share none.
fn instruction(task: &EvalTask) -> String {
    let mut prompts = task.items.iter().chain(&task.train).map(|i| &i.prompt);
    let Some(first) = prompts.next() else {
        return String::new();
    };
    let mut shared: Vec<&str> = first.split_inclusive('\n').collect();
    // The last line holds the question itself.
    shared.pop();
    for p in prompts {
        let same = shared
            .iter()
            .zip(p.split_inclusive('\n'))
            .take_while(|(a, b)| **a == *b)
            .count();
        shared.truncate(same);
    }
    shared.concat()
}

/// A text on one line: line breaks as spaces, ends trimmed.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One group: the instruction, `Q[i]: question` lines, then `A[i]: answer` lines for a
/// demonstration, or `A[1]:` for the model to go on from.
fn block(instruction: &str, questions: &[&str], answers: Option<&[String]>) -> String {
    let mut out = instruction.to_string();
    for (i, q) in questions.iter().enumerate() {
        let q = q.strip_prefix(instruction).unwrap_or(q);
        out += &format!("Q[{}]: {}\n", i + 1, one_line(q));
    }
    match answers {
        Some(answers) => {
            let lines: Vec<String> = answers
                .iter()
                .enumerate()
                .map(|(i, a)| format!("A[{}]: {a}", i + 1))
                .collect();
            out + &lines.join("\n")
        }
        None => out + "A[1]:",
    }
}

/// The `k` answers of a completion that went on from `A[1]:`: the text after each `A[i]:`
/// up to the next label given, cut at the first of the task's `stop` strings; `None` for a
/// question the completion skipped.
pub fn answers(completion: &str, k: usize, stop: &[String]) -> Vec<Option<String>> {
    let text = format!("A[1]:{completion}");
    let mut out = Vec::with_capacity(k);
    let mut from = 0;
    for i in 1..=k {
        let label = format!("A[{i}]:");
        let Some(at) = text[from..].find(&label).map(|p| from + p + label.len()) else {
            out.push(None);
            continue;
        };
        // Up to the next label given, when the completion skips one.
        let end = (i + 1..=k)
            .filter_map(|j| text[at..].find(&format!("A[{j}]:")))
            .min()
            .map_or(text.len(), |p| at + p);
        let mut answer = &text[at..end];
        for s in stop.iter().filter(|s| !s.is_empty()) {
            if let Some(p) = answer.find(s.as_str()) {
                answer = &answer[..p];
            }
        }
        out.push(Some(answer.to_string()));
        from = end;
    }
    out
}

/// Each question of one answered prompt with the answer given and whether it is right: one
/// for a prompt of one question, one per question of an [`Expected::Batch`] (a skipped
/// question is wrong, with an empty answer).
pub fn judge(completion: &str, expected: &Expected) -> Vec<(String, bool)> {
    match expected {
        Expected::Batch {
            answers: want,
            stop,
        } => answers(completion, want.len(), stop)
            .into_iter()
            .zip(want)
            .map(|(got, want)| {
                let got = got.unwrap_or_default();
                let right = metric::is_right(&got, want);
                (got, right)
            })
            .collect(),
        e => vec![(completion.to_string(), metric::is_right(completion, e))],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task;

    #[test]
    fn questions_are_numbered_under_one_instruction_after_grouped_demonstrations() {
        let t = task::resolve("dates", &[]).unwrap();
        let g = grouped(&t, 4, 2).unwrap();
        assert_eq!(g.items.len(), 100, "200 questions, two to a prompt");
        let p = &g.items[0].prompt;
        let blocks: Vec<&str> = p.split(SEPARATOR).collect();
        assert_eq!(
            blocks.len(),
            3,
            "two blocks of two demonstrations, then the asked"
        );
        for b in &blocks {
            assert!(
                b.starts_with("Write the date in ISO format (YYYY-MM-DD).\nQ[1]: Date: "),
                "{b:?}"
            );
        }
        assert!(blocks[0].contains("\nQ[2]: Date: "));
        assert!(blocks[0].contains("\nA[1]: ") && blocks[0].contains("\nA[2]: "));
        assert!(blocks[2].ends_with(" ISO:\nA[1]:"), "{:?}", blocks[2]);
        assert!(blocks[2].contains("Q[1]: Date: 19 April 2047 ISO:\nQ[2]: Date: 2 November 2001"));
        let Expected::Batch { answers, stop } = &g.items[0].expected else {
            panic!("a batch of questions");
        };
        assert_eq!(answers.len(), 2);
        assert_eq!(stop, &t.stop);
        assert_eq!(g.prompting.map(|p| p.per_prompt), Some(2));
        // Three to a prompt: the last prompt holds the two left over.
        let g = grouped(&t, 0, 3).unwrap();
        assert_eq!(g.items.len(), 67);
        let Expected::Batch { answers, .. } = &g.items[66].expected else {
            panic!("a batch of questions");
        };
        assert_eq!(answers.len(), 2);
        assert!(!g.items[0].prompt.contains(SEPARATOR), "no demonstrations");
    }

    #[test]
    fn answers_are_read_back_by_label_and_cut_at_the_tasks_stop() {
        let stop = vec!["\n".to_string()];
        let got = answers(" 2047-04-19\nA[2]: 2001-11-02\nA[3]:1965-12-18", 3, &stop);
        assert_eq!(
            got,
            [" 2047-04-19", " 2001-11-02", "1965-12-18"].map(|a| Some(a.to_string()))
        );
        // A skipped label is a missing answer; the others still count.
        let got = answers(" a\nA[3]: c", 3, &stop);
        assert_eq!(got, vec![Some(" a".into()), None, Some(" c".into())]);
        assert_eq!(answers("", 2, &stop), vec![Some(String::new()), None]);
        let expected = Expected::Batch {
            answers: vec![Expected::Answer(" x".into()), Expected::Answer(" y".into())],
            stop,
        };
        assert_eq!(
            judge(" x\nA[2]: z", &expected),
            vec![(" x".into(), true), (" z".into(), false)]
        );
        assert_eq!(
            judge(" x", &Expected::Answer("x".into())),
            vec![(" x".into(), true)]
        );
    }

    #[test]
    fn a_prompt_set_with_no_shared_first_line_has_no_instruction() {
        let mut t = task::resolve("units", &[]).unwrap();
        assert_eq!(instruction(&t), "Convert the quantity.\n");
        t.items[0].prompt = "What is 3 km in m?".into();
        assert_eq!(instruction(&t), "");
        let g = grouped(&t, 0, 2).unwrap();
        assert!(
            g.items[0].prompt.starts_with(
                "Q[1]: What is 3 km in m?\nQ[2]: Convert the quantity. 287 cm in mm:\nA[1]:"
            ),
            "{:?}",
            g.items[0].prompt
        );
    }
}
