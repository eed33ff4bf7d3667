//! FrugalGPT cascades served as a model (Chen, Zaharia and Zou 2023): a request to the
//! cascade's name goes to its cheapest stage, whose answer is kept when the stage's
//! [`scorer`] gives its [`features`] at least the stage's threshold, else passed on to the
//! next stage; the last stage always answers. `ft cascade fit` chooses the stages, scorers
//! and thresholds; the server runs them ([`crate::server`]) and says which stage answered.

pub mod features;
pub mod scorer;

use serde_json::{Map, Value};

use features::{vote, Features};
use scorer::Logistic;

/// Where a stage's requests go.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// This server's base or one of its adapters, by the name requests give it.
    Local {
        /// The served model's name.
        model: String,
    },
    /// Another OpenAI-compatible server's `/v1/completions`.
    Remote {
        /// `http://host:port`.
        url: String,
        /// The model that server answers with.
        model: String,
        /// Its `Authorization: Bearer` key, if it wants one.
        api_key: Option<String>,
    },
}

/// What a stage's answer costs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Price {
    /// USD per million prompt and generated tokens.
    PerToken {
        /// Per million prompt tokens.
        input: f64,
        /// Per million generated tokens.
        output: f64,
    },
    /// USD per hour of the time its requests take.
    PerHour(f64),
}

impl Price {
    /// The cost, USD, of a request of `prompt` and `output` tokens that took `seconds`.
    pub fn cost(self, prompt: usize, output: usize, seconds: f64) -> f64 {
        match self {
            Self::PerToken { input, output: o } => {
                (input * prompt as f64 + o * output as f64) / 1e6
            }
            Self::PerHour(usd) => usd * seconds / 3600.0,
        }
    }
}

/// One stage as served.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// How responses and metrics name it.
    pub name: String,
    /// Who answers.
    pub target: Target,
    /// Put before every prompt: the stage's few-shot demonstrations and their separator, or
    /// nothing. The prompt's leading whitespace is dropped after it, as the fit joined them.
    pub context: String,
    /// Fields each request's body gets (`temperature`, `top_p`, `use_beam_search`,
    /// `best_of`); a `seed` among them is replaced by a fresh one per request.
    pub fields: Map<String, Value>,
    /// Requests per answer: 1, or N sampled answers and their majority (self-consistency).
    pub samples: usize,
    /// Top log-probabilities asked per token for the features; none where the decoding
    /// returns none (beam search).
    pub logprobs: Option<usize>,
    /// The scorer and the score at which this stage's answer is kept; `None` for the last
    /// stage, which always answers.
    pub accept: Option<(Logistic, f64)>,
    /// What its answers cost.
    pub price: Price,
}

impl Stage {
    /// The prompt this stage is asked: its context, then `prompt`.
    pub fn prompt(&self, prompt: &str) -> String {
        if self.context.is_empty() {
            prompt.to_string()
        } else {
            format!("{}{}", self.context, prompt.trim_start())
        }
    }

    /// The body of its `j`th request for `prompt`: the caller's `base` fields (length, stop
    /// strings), then the stage's model, prompt, decoding and log-probabilities.
    pub fn body(&self, base: &Map<String, Value>, prompt: &str, seed: u64) -> Value {
        let mut body = base.clone();
        let model = match &self.target {
            Target::Local { model } | Target::Remote { model, .. } => model,
        };
        body.insert("model".into(), model.clone().into());
        body.insert("prompt".into(), self.prompt(prompt).into());
        body.insert("stream".into(), false.into());
        for (k, v) in &self.fields {
            let v = if k == "seed" { seed.into() } else { v.clone() };
            body.insert(k.clone(), v);
        }
        match self.logprobs {
            Some(n) => body.insert("logprobs".into(), n.into()),
            None => body.remove("logprobs"),
        };
        Value::Object(body)
    }

    /// Whether to keep an answer with `features`: the last stage always does, the others when
    /// their scorer gives at least their threshold.
    pub fn keeps(&self, features: &Features) -> bool {
        match &self.accept {
            None => true,
            Some((scorer, threshold)) => scorer.score(&features.vector()) >= *threshold,
        }
    }
}

/// A stage's reply to one request, read from its completion body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The completion's text.
    pub text: String,
    /// Its body as the stage answered it.
    pub body: Value,
    /// Prompt tokens (its usage).
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// The generated tokens' scores.
    pub tokens: Vec<features::TokenScore>,
    /// It ended on a stop string or token.
    pub stopped: bool,
}

impl Reply {
    /// The first choice of a `/v1/completions` body; `None` when it has none.
    pub fn of(body: Value) -> Option<Self> {
        let choice = body["choices"].get(0)?;
        let text = choice["text"].as_str()?.to_string();
        let tokens = features::parse_logprobs(&choice["logprobs"]);
        let stopped = choice["finish_reason"] == "stop";
        let usage = |k: &str| body["usage"][k].as_u64().map(|n| n as usize);
        Some(Self {
            text,
            prompt_tokens: usage("prompt_tokens").unwrap_or(0),
            // A server without usage: its scored tokens.
            completion_tokens: usage("completion_tokens").unwrap_or(tokens.len()),
            tokens,
            stopped,
            body,
        })
    }
}

/// A stage's answer: the reply kept (self-consistency's majority) and its features.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The reply kept.
    pub reply: Reply,
    /// Its features.
    pub features: Features,
}

/// The answer of a stage that replied `replies` (one per sample), as the fit scored it.
pub fn answer(mut replies: Vec<Reply>) -> Option<Answer> {
    let texts: Vec<String> = replies.iter().map(|r| r.text.clone()).collect();
    let (chosen, agreement) = if replies.len() > 1 {
        vote(&texts)
    } else {
        (0, 1.0)
    };
    if chosen >= replies.len() {
        return None;
    }
    let reply = replies.swap_remove(chosen);
    let features = Features::of(
        &reply.tokens,
        reply.completion_tokens,
        reply.prompt_tokens,
        reply.stopped,
        agreement,
    );
    Some(Answer { reply, features })
}

/// A cascade as served: its name (the `model` requests give) and its stages, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Cascade {
    /// The model name requests use.
    pub name: String,
    /// The stages the fit kept, cheapest first.
    pub stages: Vec<Stage>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stage(accept: Option<(Logistic, f64)>) -> Stage {
        Stage {
            name: "s".into(),
            target: Target::Local {
                model: "units".into(),
            },
            context: "Q: 1+1\nA: 2\n\n".into(),
            fields: json!({"temperature": 0.7, "seed": 0})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            samples: 3,
            logprobs: Some(5),
            accept,
            price: Price::PerToken {
                input: 1.0,
                output: 2.0,
            },
        }
    }

    #[test]
    fn a_request_body_carries_the_stage_context_decoding_and_seed() {
        let base = json!({"max_tokens": 8, "stop": ["\n"], "logprobs": 1, "model": "casc"});
        let body = stage(None).body(base.as_object().unwrap(), "  Q: 2+2\nA:", 42);
        assert_eq!(body["model"], "units");
        assert_eq!(body["prompt"], "Q: 1+1\nA: 2\n\nQ: 2+2\nA:");
        assert_eq!(
            (body["seed"].as_u64(), body["logprobs"].as_u64()),
            (Some(42), Some(5))
        );
        assert_eq!(
            (body["max_tokens"].as_u64(), body["temperature"].as_f64()),
            (Some(8), Some(0.7))
        );
        let mut beam = stage(None);
        beam.logprobs = None;
        beam.context.clear();
        let body = beam.body(base.as_object().unwrap(), "  x", 1);
        assert!(body.get("logprobs").is_none());
        assert_eq!(body["prompt"], "  x");
    }

    #[test]
    fn an_answer_is_the_majority_reply_scored_as_the_fit_scored_it() {
        let reply = |text: &str, lp: f64| {
            Reply::of(json!({
                "choices": [{"text": text, "finish_reason": "stop",
                    "logprobs": {"token_logprobs": [lp, lp], "top_logprobs": [{"a": lp}, {"b": lp}]}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 2},
            }))
            .unwrap()
        };
        let a = answer(vec![reply(" 4", -0.1), reply("5", -2.0), reply("4 ", -0.3)]).unwrap();
        assert_eq!(a.reply.text, " 4");
        let f = a.features;
        assert!((f.agreement - 2.0 / 3.0).abs() < 1e-12 && f.stopped);
        assert_eq!(
            (f.answer_tokens, f.prompt_tokens, f.mean_logprob),
            (2, 10, -0.1)
        );
        assert!(answer(Vec::new()).is_none());
        assert!(Reply::of(json!({"choices": []})).is_none());

        // A scorer that rises with the mean log-probability keeps confident answers only.
        let names: Vec<String> = features::NAMES.iter().map(|n| n.to_string()).collect();
        let mut weights = vec![0.0; names.len()];
        weights[0] = 4.0;
        let scorer = Logistic {
            mean: vec![-1.0; names.len()],
            scale: vec![1.0; names.len()],
            features: names,
            weights,
            bias: 0.0,
        };
        let s = stage(Some((scorer, 0.5)));
        assert!(s.keeps(&a.features));
        let unsure = answer(vec![reply("7", -3.0)]).unwrap();
        assert!(!s.keeps(&unsure.features));
        assert!(
            stage(None).keeps(&unsure.features),
            "the last stage answers"
        );
    }

    #[test]
    fn prices_per_token_and_per_hour() {
        let p = Price::PerToken {
            input: 1.0,
            output: 2.0,
        };
        assert!((p.cost(1_000_000, 500_000, 9.0) - 2.0).abs() < 1e-12);
        assert!((Price::PerHour(3.6).cost(10, 10, 2.0) - 0.002).abs() < 1e-12);
    }
}
