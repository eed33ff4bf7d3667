//! The thread that owns the engine: it takes commands from the HTTP handlers between steps,
//! steps while there is work, routes each event to its request's channel, and cancels a
//! request whose channel was dropped (the client went away), which frees its blocks.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ft_model::QuantBackend;
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::engine::{Engine, EngineStats};
use crate::error::EngineError;
use crate::request::{Event, Request};

/// What a handler asks of the engine thread.
pub enum Command {
    /// Queue a request; its events arrive on the returned channel.
    Submit {
        /// The request.
        request: Request,
        /// The answer: the events' channel, or why it was refused.
        reply: oneshot::Sender<Result<tmpsc::UnboundedReceiver<Event>, EngineError>>,
    },
    /// Make a PEFT folder servable under a name.
    Load {
        /// Adapter name.
        name: String,
        /// Its folder.
        dir: PathBuf,
        /// Done, or why not.
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// Forget an adapter.
    Unload {
        /// Adapter name.
        name: String,
        /// Done, or why not.
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// The adapters' names.
    Adapters {
        /// The names.
        reply: oneshot::Sender<Vec<String>>,
    },
}

/// The engine's counters, refreshed after every step, and its recent throughput.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    /// Counters.
    pub stats: EngineStats,
    /// Generated tokens per second, averaged over the last steps with work.
    pub tokens_per_s: f64,
}

/// The sha256 of each servable adapter's files and its registration number, by name, as the
/// engine thread last published them: the response cache keys answers by the sha256 without
/// a round trip to the engine, and stores an answer only if the registration is unchanged.
pub type AdapterPrints = Arc<Mutex<BTreeMap<String, ([u8; 32], u64)>>>;

/// Runs `engine` until every command sender is gone, publishing its counters into `live` and
/// its adapters' fingerprints into `prints` after each load and unload.
pub fn run<B: QuantBackend>(
    mut engine: Engine<B>,
    commands: Receiver<Command>,
    live: Arc<Mutex<Live>>,
    prints: AdapterPrints,
) {
    let mut channels: HashMap<u64, tmpsc::UnboundedSender<Event>> = HashMap::new();
    let mut window: Vec<(Instant, u64)> = Vec::new();
    loop {
        // Block for a command when idle; otherwise take what has arrived and step.
        let first = if engine.has_work() {
            match commands.try_recv() {
                Ok(c) => Some(c),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => return,
            }
        } else {
            match commands.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        };
        if let Some(c) = first {
            handle(&mut engine, &mut channels, &prints, c);
            while let Ok(c) = commands.try_recv() {
                handle(&mut engine, &mut channels, &prints, c);
            }
        }
        // Clients that went away: their requests stop now.
        let gone: Vec<u64> = channels
            .iter()
            .filter(|(_, tx)| tx.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            channels.remove(&id);
            engine.cancel(id);
        }
        if engine.has_work() {
            for event in engine.step() {
                let id = event.id();
                let last = matches!(event, Event::Finished { .. } | Event::Failed { .. });
                let delivered = channels.get(&id).is_some_and(|tx| tx.send(event).is_ok());
                if !delivered {
                    engine.cancel(id);
                }
                if last || !delivered {
                    channels.remove(&id);
                }
            }
        }
        let stats = engine.stats();
        let now = Instant::now();
        window.push((now, stats.generated_tokens));
        window.retain(|(t, _)| now.duration_since(*t).as_secs_f64() <= 5.0);
        let tokens_per_s = match (window.first(), window.last()) {
            (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64(),
            _ => 0.0,
        };
        if let Ok(mut l) = live.lock() {
            *l = Live {
                stats,
                tokens_per_s,
            };
        }
    }
}

fn handle<B: QuantBackend>(
    engine: &mut Engine<B>,
    channels: &mut HashMap<u64, tmpsc::UnboundedSender<Event>>,
    prints: &AdapterPrints,
    command: Command,
) {
    let publish = |engine: &Engine<B>| {
        if let Ok(mut p) = prints.lock() {
            *p = engine.adapters().fingerprints();
        }
    };
    match command {
        Command::Submit { request, reply } => {
            let answer = engine.submit(request).map(|id| {
                let (tx, rx) = tmpsc::unbounded_channel();
                channels.insert(id, tx);
                rx
            });
            let _ = reply.send(answer);
        }
        Command::Load { name, dir, reply } => {
            let done = engine.register_adapter(&name, dir);
            publish(engine);
            let _ = reply.send(done);
        }
        Command::Unload { name, reply } => {
            let done = engine.unregister_adapter(&name);
            publish(engine);
            let _ = reply.send(done);
        }
        Command::Adapters { reply } => {
            let _ = reply.send(engine.adapters().names());
        }
    }
}
