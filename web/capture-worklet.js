// AudioWorklet: microphone → 16 kHz mono PCM16, posted as 60 ms frames
// (960 samples, 1920 bytes) to the page, which sends each as one binary
// WebSocket message (docs/protocol.md: "Send 60 ms frames or larger").
//
// The context runs at the device's rate (44.1 / 48 kHz, ...): channels are
// averaged, low-passed by a windowed-sinc FIR below the new Nyquist, then
// picked at fractional positions with linear interpolation.

class PcmCaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.targetRate = opts.targetRate || 16000;
    this.frameSamples = opts.frameSamples || Math.round(this.targetRate * 0.06);
    this.step = sampleRate / this.targetRate; // input samples per output sample
    this.taps = this.step > 1.0001 ? makeLowPass(0.45 / this.step, 31) : null;
    this.history = new Float32Array(this.taps ? this.taps.length : 1); // FIR delay line
    this.histPos = 0;
    this.prev = 0; // last filtered input sample (for interpolation across blocks)
    this.pos = 0; // fractional read position relative to the current block
    this.frame = new Int16Array(this.frameSamples);
    this.fill = 0;
    this.enabled = true;
    this.port.onmessage = (e) => {
      if (e.data && e.data.type === "enable") this.enabled = !!e.data.value;
      if (e.data && e.data.type === "flush") this.fill = 0;
    };
  }

  filter(x) {
    if (!this.taps) return x;
    const n = this.taps.length;
    this.history[this.histPos] = x;
    let acc = 0;
    let idx = this.histPos;
    for (let i = 0; i < n; i++) {
      acc += this.taps[i] * this.history[idx];
      idx = idx === 0 ? n - 1 : idx - 1;
    }
    this.histPos = (this.histPos + 1) % n;
    return acc;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || !input[0]) return true;
    const len = input[0].length;
    const mono = new Float32Array(len);
    for (let c = 0; c < input.length; c++) {
      const ch = input[c];
      for (let i = 0; i < len; i++) mono[i] += ch[i] / input.length;
    }
    for (let i = 0; i < len; i++) mono[i] = this.filter(mono[i]);
    // output sample k sits at input position this.pos (may be in [-1, 0): between prev and mono[0])
    while (this.pos < len - 1 + 1e-9) {
      const i0 = Math.floor(this.pos);
      const frac = this.pos - i0;
      const a = i0 < 0 ? this.prev : mono[i0];
      const b = mono[Math.min(i0 + 1, len - 1)];
      this.push(a + (b - a) * frac);
      this.pos += this.step;
    }
    this.pos -= len;
    this.prev = mono[len - 1];
    return true;
  }

  push(v) {
    const s = Math.max(-1, Math.min(1, v));
    this.frame[this.fill++] = s < 0 ? Math.round(s * 32768) : Math.round(s * 32767);
    if (this.fill === this.frameSamples) {
      if (this.enabled) {
        const out = this.frame.buffer.slice(0);
        this.port.postMessage(out, [out]);
      }
      this.fill = 0;
    }
  }
}

function makeLowPass(cutoff, n) {
  // cutoff as a fraction of the input rate; Blackman-windowed sinc, unity DC gain
  const taps = new Float32Array(n);
  const m = (n - 1) / 2;
  let sum = 0;
  for (let i = 0; i < n; i++) {
    const x = i - m;
    const sinc = x === 0 ? 2 * cutoff : Math.sin(2 * Math.PI * cutoff * x) / (Math.PI * x);
    const w = 0.42 - 0.5 * Math.cos((2 * Math.PI * i) / (n - 1)) + 0.08 * Math.cos((4 * Math.PI * i) / (n - 1));
    taps[i] = sinc * w;
    sum += taps[i];
  }
  for (let i = 0; i < n; i++) taps[i] /= sum;
  return taps;
}

registerProcessor("pcm-capture", PcmCaptureProcessor);
