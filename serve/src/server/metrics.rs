//! `/metrics` in the Prometheus text format: the engine's queue, running requests, KV
//! blocks and throughput as gauges, token and request counters, and histograms of time to
//! first token, time per output token and request latency; the response cache's hits,
//! misses, failures and the latency of its answers; each served cascade's stages: requests
//! asked, answers kept and what they cost.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use super::worker::Live;
use crate::response_cache::ResponseCache;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// A cumulative histogram.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&mut self, seconds: f64) {
        for (c, le) in self.counts.iter_mut().zip(BUCKETS) {
            if seconds <= le {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, le) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

/// What the HTTP side measures.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Seconds from arrival to the first token.
    pub ttft: Histogram,
    /// Seconds between output tokens after the first.
    pub tpot: Histogram,
    /// Seconds from arrival to the end.
    pub latency: Histogram,
    /// Seconds from arrival to the answer, of requests the response cache answered at once
    /// (not those that waited for the same request in flight).
    pub cache_hit: Histogram,
    /// Finished requests by HTTP status.
    pub requests: std::collections::BTreeMap<u16, u64>,
    /// Per served cascade and stage (by name): what its stages did.
    pub cascades: std::collections::BTreeMap<(String, String), StageCounts>,
}

/// What one stage of a served cascade did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageCounts {
    /// Requests that reached the stage.
    pub asked: u64,
    /// Requests whose answer the stage gave.
    pub answered: u64,
    /// What the stage's requests cost, USD.
    pub cost_usd: f64,
}

impl Metrics {
    /// The exposition text, with the response cache's counters when there is one.
    pub fn render(&self, live: &Live, cache: Option<&ResponseCache>) -> String {
        let s = &live.stats;
        let mut out = String::new();
        let gauges = [
            (
                "ft_requests_waiting",
                "Requests in the queue.",
                s.waiting as f64,
            ),
            (
                "ft_requests_running",
                "Requests being generated.",
                s.running as f64,
            ),
            (
                "ft_kv_blocks_used",
                "KV cache blocks referenced.",
                s.blocks_used as f64,
            ),
            (
                "ft_kv_blocks_total",
                "KV cache blocks in all.",
                s.blocks_total as f64,
            ),
            (
                "ft_kv_blocks_cached",
                "Blocks kept by the prefix cache.",
                s.blocks_cached as f64,
            ),
            (
                "ft_adapters_loaded",
                "Adapters in memory.",
                s.adapters_loaded as f64,
            ),
            (
                "ft_generation_tokens_per_second",
                "Generated tokens per second, last 5 s.",
                live.tokens_per_s,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory of the server process.",
                crate::rss::rss_bytes() as f64,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let counters = [
            (
                "ft_prompt_tokens_total",
                "Prompt tokens run through the model.",
                s.prompt_tokens,
            ),
            (
                "ft_generation_tokens_total",
                "Tokens generated.",
                s.generated_tokens,
            ),
            (
                "ft_preemptions_total",
                "Requests preempted for lack of KV blocks.",
                s.preemptions,
            ),
            (
                "ft_adapter_loads_total",
                "Adapters read from disk into memory.",
                s.adapter_loads,
            ),
            (
                "ft_prefix_cache_hits_total",
                "Prompt blocks found in the prefix cache.",
                s.prefix_hits,
            ),
            (
                "ft_prefix_cache_queries_total",
                "Prompt blocks looked up in the prefix cache.",
                s.prefix_lookups,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let name = "ft_http_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} Generation requests by HTTP status.\n# TYPE {name} counter"
        );
        for (status, n) in &self.requests {
            let _ = writeln!(out, "{name}{{status=\"{status}\"}} {n}");
        }
        self.ttft.write(
            &mut out,
            "ft_time_to_first_token_seconds",
            "Time to first token.",
        );
        self.tpot.write(
            &mut out,
            "ft_time_per_output_token_seconds",
            "Time between output tokens.",
        );
        self.latency.write(
            &mut out,
            "ft_request_latency_seconds",
            "Request latency, end to end.",
        );
        self.write_cascades(&mut out);
        if let Some(cache) = cache {
            write_cache(&mut out, cache);
            self.cache_hit.write(
                &mut out,
                "ft_response_cache_hit_seconds",
                "Latency of requests the response cache answered at once.",
            );
        }
        out
    }

    /// Every served cascade's stages, labelled by cascade and stage.
    fn write_cascades(&self, out: &mut String) {
        if self.cascades.is_empty() {
            return;
        }
        let families: [Family; 3] = [
            (
                "ft_cascade_requests_total",
                "Requests that reached a cascade's stage.",
                |c| c.asked as f64,
            ),
            (
                "ft_cascade_answers_total",
                "Requests a cascade's stage answered.",
                |c| c.answered as f64,
            ),
            (
                "ft_cascade_cost_usd_total",
                "What a cascade's stage cost, USD (its price, or its time at the hourly price).",
                |c| c.cost_usd,
            ),
        ];
        for (name, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((cascade, stage), counts) in &self.cascades {
                let _ = writeln!(
                    out,
                    "{name}{{cascade=\"{}\",stage=\"{}\"}} {}",
                    label(cascade),
                    label(stage),
                    value(counts)
                );
            }
        }
    }
}

/// A labelled counter family: its name, its help, and its value from a stage's counts.
type Family = (&'static str, &'static str, fn(&StageCounts) -> f64);

/// `value` escaped as a Prometheus label value.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The response cache's counters and, in memory, its bytes.
fn write_cache(out: &mut String, cache: &ResponseCache) {
    let s = cache.stats();
    let counters = [
        (
            "ft_response_cache_hits_total",
            "Requests answered from the response cache.",
            &s.hits,
        ),
        (
            "ft_response_cache_misses_total",
            "Cacheable requests the response cache did not hold.",
            &s.misses,
        ),
        (
            "ft_response_cache_stores_total",
            "Answers stored in the response cache.",
            &s.stores,
        ),
        (
            "ft_response_cache_coalesced_total",
            "Requests that waited for the same request in flight instead of generating it.",
            &s.coalesced,
        ),
        (
            "ft_response_cache_errors_total",
            "Reads and writes the cache's store failed (each failed read is also a miss).",
            &s.errors,
        ),
    ];
    for (name, help, v) in counters {
        let v = v.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }
    let name = "ft_response_cache_bytes";
    let _ = writeln!(
        out,
        "# HELP {name} Bytes of answers the in-memory cache holds.\n# TYPE {name} gauge\n{name} {}",
        cache.bytes()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(0.02);
        h.observe(3.0);
        let mut out = String::new();
        h.write(&mut out, "x", "X.");
        assert!(out.contains("x_bucket{le=\"0.01\"} 0\n"));
        assert!(out.contains("x_bucket{le=\"0.025\"} 1\n"));
        assert!(out.contains("x_bucket{le=\"5\"} 2\n"));
        assert!(out.contains("x_bucket{le=\"+Inf\"} 2\nx_sum 3.02\nx_count 2\n"));
    }

    #[test]
    fn cascade_stages_are_labelled_counters() {
        let mut m = Metrics::default();
        m.cascades.insert(
            ("units".into(), "cheap \"q4\"".into()),
            StageCounts {
                asked: 3,
                answered: 2,
                cost_usd: 0.5,
            },
        );
        let out = m.render(&Live::default(), None);
        assert!(
            out.contains("# TYPE ft_cascade_answers_total counter\n"),
            "{out}"
        );
        assert!(
            out.contains(
                "ft_cascade_requests_total{cascade=\"units\",stage=\"cheap \\\"q4\\\"\"} 3\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "ft_cascade_answers_total{cascade=\"units\",stage=\"cheap \\\"q4\\\"\"} 2\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "ft_cascade_cost_usd_total{cascade=\"units\",stage=\"cheap \\\"q4\\\"\"} 0.5\n"
            ),
            "{out}"
        );
    }
}
