// The browser tests' window into the voice page (tests/test_web_page.py).
// Only a page opened with `?test=1` gets it: a production page keeps no copy
// of the reply audio or of the events.
// Without the flag every recording call below is a no-op.

const KEEP_PCM_SECONDS = 120; // the hook keeps at most this much received audio
const KEEP_EVENTS = 2000;
const KEEP_PEAKS = 400; // microphone frame peaks: 24 s of 60 ms frames

/** True when this page was opened for a test (`?test=1`). */
export function testing() {
  return new URLSearchParams(location.search).get("test") === "1";
}

const noop = () => {};
const OFF = Object.freeze({
  event: noop,
  hello: noop,
  audio: noop,
  dropped: noop,
  sent: noop,
  frame: noop,
  micPeak: noop,
  stop: noop,
});

/**
 * The hook: `view` reads the page's live state ({player, state}). → the
 * recorder the page calls; when testing, `window.voiceTest` holds read-only
 * views of what it recorded (it can change nothing on the page).
 */
export function createTestHook(view) {
  if (!testing()) return OFF;
  const { player, state } = view;
  const pcmKeep = { samples: 0 };
  const t = {
    events: [],
    receivedPcm: [], // Int16Array chunks of reply audio, in arrival order
    receivedTurns: [], // the turn id of each chunk
    sentFrames: 0,
    sent: [], // JSON messages this page sent
    stops: [], // local playback stops: {reason, stopped, turn, at}
    droppedChunks: 0, // audio of an interrupted turn that arrived after the stop
    hellos: [],
    micFrames: 0, // frames the microphone produced (sent or not)
    micPeaks: [], // the peak of each of the latest frames, 0..32767
    get playedSamples() {
      return player.played;
    },
    get activeSources() {
      return player.active;
    },
    /** Playback gaps inside a turn: {turn, seconds} for each chunk that came after its turn's audio ran out. */
    get gaps() {
      return player.gaps.slice();
    },
    get state() {
      return {
        connected: state.open,
        sessionId: state.sessionId,
        mode: state.mode,
        outputRate: state.outputRate,
        audioContext: player.ctx ? player.ctx.state : "none",
        loggedIn: !!state.token,
      };
    },
    turnPcm(turnId) {
      const parts = t.receivedPcm.filter((_, i) => t.receivedTurns[i] === turnId);
      const out = new Int16Array(parts.reduce((n, p) => n + p.length, 0));
      let at = 0;
      for (const p of parts) {
        out.set(p, at);
        at += p.length;
      }
      return out;
    },
  };
  window.voiceTest = t;
  const keep = (list, item, max) => {
    list.push(item);
    if (list.length > max) list.splice(0, list.length - max);
  };
  return {
    event: (msg) => keep(t.events, msg, KEEP_EVENTS),
    hello: (msg) => t.hellos.push(msg),
    audio(turnId, samples) {
      t.receivedPcm.push(samples);
      t.receivedTurns.push(turnId);
      pcmKeep.samples += samples.length;
      while (pcmKeep.samples > KEEP_PCM_SECONDS * state.outputRate && t.receivedPcm.length > 1) {
        pcmKeep.samples -= t.receivedPcm.shift().length;
        t.receivedTurns.shift();
      }
    },
    dropped: () => (t.droppedChunks += 1),
    sent: (obj) => keep(t.sent, obj, KEEP_EVENTS),
    frame: () => (t.sentFrames += 1),
    micPeak(peak) {
      t.micFrames += 1;
      keep(t.micPeaks, peak, KEEP_PEAKS);
    },
    stop: (item) => keep(t.stops, item, 100),
  };
}
