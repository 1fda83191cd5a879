// Microphone capture (AudioWorklet → 16 kHz PCM16 frames) and gap-free
// playback of the server's PCM16 reply audio, scheduled on the AudioContext
// clock so that it can be stopped at once.

export const INPUT_RATE = 16000;
export const FRAME_MS = 60;

export class MicDeniedError extends Error {}

export class Capture {
  /** onFrame(ArrayBuffer) gets every 60 ms frame of 16 kHz mono PCM16. */
  constructor(onFrame) {
    this.onFrame = onFrame;
    this.ctx = null;
    this.stream = null;
    this.node = null;
    this.source = null;
  }

  get running() {
    return this.node !== null;
  }

  async start() {
    if (this.running) return;
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new MicDeniedError("This browser gives no microphone access here (it needs https or localhost).");
    }
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
    } catch (e) {
      const name = e && e.name;
      if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
        throw new MicDeniedError("Microphone access was denied. Allow it in the browser's site settings, or type below.");
      }
      if (name === "NotFoundError" || name === "OverconstrainedError") {
        throw new MicDeniedError("No microphone was found. You can still type below.");
      }
      throw new MicDeniedError(`The microphone could not be opened (${name || e}). You can still type below.`);
    }
    this.ctx = new AudioContext();
    await this.ctx.audioWorklet.addModule(new URL("capture-worklet.js", import.meta.url));
    this.source = this.ctx.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.ctx, "pcm-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 0,
      processorOptions: { targetRate: INPUT_RATE, frameSamples: (INPUT_RATE * FRAME_MS) / 1000 },
    });
    this.node.port.onmessage = (e) => this.onFrame(e.data);
    this.source.connect(this.node);
    if (this.ctx.state !== "running") await this.ctx.resume();
  }

  async stop() {
    if (this.node) {
      this.node.port.onmessage = null;
      this.source.disconnect();
      this.node.disconnect();
    }
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    if (this.ctx) await this.ctx.close().catch(() => {});
    this.ctx = this.stream = this.node = this.source = null;
  }
}

export class Player {
  /** Plays PCM16 chunks back to back on one AudioContext's clock. */
  constructor() {
    this.ctx = null;
    this.nextTime = 0;
    this.scheduled = []; // {src, start, end, samples, rate}
    this.playedSamples = 0; // output samples (at the chunk's rate) that have actually played
    this.stoppedAt = null;
    this.lastTurn = null; // the turn of the latest chunk
    this.gaps = []; // {turn, seconds}: silence inserted inside a turn because its next chunk came late
  }

  async unlock() {
    // called from a click: browsers let an AudioContext start only after a gesture
    if (!this.ctx) this.ctx = new AudioContext();
    if (this.ctx.state !== "running") await this.ctx.resume().catch(() => {});
  }

  get active() {
    this.tick();
    return this.scheduled.length;
  }

  get playing() {
    return this.active > 0;
  }

  /** Schedule one chunk of PCM16 (Int16Array) at `rate` of `turn` right after the previous one. */
  enqueue(samples, rate, turn = null) {
    if (!this.ctx || samples.length === 0) return;
    const buf = this.ctx.createBuffer(1, samples.length, rate);
    const ch = buf.getChannelData(0);
    for (let i = 0; i < samples.length; i++) ch[i] = samples[i] / 32768;
    const src = this.ctx.createBufferSource();
    src.buffer = buf;
    src.connect(this.ctx.destination);
    const now = this.ctx.currentTime;
    // a small lead when (re)starting, then strictly back to back: no gaps, no overlaps
    if (this.nextTime < now + 0.02) {
      // the turn's audio ran out before this chunk of it came: an audible gap (an underrun)
      if (turn !== null && turn === this.lastTurn && this.nextTime > 0) {
        this.gaps.push({ turn, seconds: now + 0.06 - this.nextTime });
        if (this.gaps.length > 100) this.gaps.shift();
      }
      this.nextTime = now + 0.06;
    }
    this.lastTurn = turn;
    const start = this.nextTime;
    src.start(start);
    const item = { src, start, end: start + buf.duration, samples: samples.length, rate };
    src.onended = () => this.tick();
    this.scheduled.push(item);
    this.nextTime = item.end;
  }

  /** Count what has played so far; forget finished sources. */
  tick() {
    if (!this.ctx) return;
    const now = this.ctx.currentTime;
    while (this.scheduled.length && this.scheduled[0].end <= now) {
      this.playedSamples += this.scheduled[0].samples;
      this.scheduled.shift();
    }
  }

  /** Samples played so far, including the part of the chunk playing now. */
  get played() {
    this.tick();
    if (!this.ctx || !this.scheduled.length) return this.playedSamples;
    const head = this.scheduled[0];
    const now = this.ctx.currentTime;
    const partial = now > head.start ? Math.floor((now - head.start) * head.rate) : 0;
    return this.playedSamples + Math.min(partial, head.samples);
  }

  /** Stop every scheduled source now (barge-in, interrupt). → how many were stopped. */
  stopAll() {
    if (!this.ctx) return 0;
    const now = this.ctx.currentTime;
    this.tick();
    let stopped = 0;
    for (const item of this.scheduled) {
      if (now > item.start) this.playedSamples += Math.min(item.samples, Math.floor((now - item.start) * item.rate));
      item.src.onended = null;
      try {
        item.src.stop();
      } catch (_) {
        /* not started yet in some engines: disconnecting below is enough */
      }
      item.src.disconnect();
      stopped++;
    }
    this.scheduled = [];
    this.nextTime = 0;
    this.stoppedAt = now;
    return stopped;
  }

  /** Seconds of audio still queued after now. */
  get queuedSeconds() {
    if (!this.ctx) return 0;
    return Math.max(0, this.nextTime - this.ctx.currentTime);
  }
}
