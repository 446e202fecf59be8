// rate-chart.js: counts events per second and draws the last 60 seconds as bars on a <canvas>. Used by app.js
// for the dashboard's "messages per second" panel; no dependencies.

/** Seconds shown on the chart. */
const WINDOW = 60;

/** A per-second counter with a canvas bar chart of the last {@link WINDOW} seconds. */
export class RateChart {
  /**
   * @param {HTMLCanvasElement} canvas  drawn on; its CSS size decides the chart size
   * @param {{onTick?: (perSecond: number) => void}} [options]  `onTick` gets the last full second's count
   */
  constructor(canvas, options = {}) {
    this.canvas = canvas;
    this.onTick = options.onTick ?? (() => {});
    /** Counts of the last WINDOW seconds, oldest first; the last entry is the second in progress. */
    this.buckets = new Array(WINDOW).fill(0);
    this.second = Math.floor(Date.now() / 1000);
    /** The second the chart was last drawn for. */
    this.shownSecond = this.second;
    this.total = 0;

    new ResizeObserver(() => this.draw()).observe(canvas);
    setInterval(() => this.tick(), 250);
    this.draw();
  }

  /** Counts `n` events now. */
  add(n = 1) {
    this.roll();
    this.buckets[WINDOW - 1] += n;
    this.total += n;
  }

  /** Moves the window forward to the current second. */
  roll() {
    const now = Math.floor(Date.now() / 1000);
    const gap = now - this.second;
    if (gap <= 0) return;
    const shift = Math.min(gap, WINDOW);
    this.buckets.splice(0, shift);
    for (let i = 0; i < shift; i++) this.buckets.push(0);
    this.second = now;
  }

  tick() {
    this.roll();
    if (this.second === this.shownSecond) return;
    this.shownSecond = this.second;
    const last = this.buckets[WINDOW - 2];
    this.canvas.dataset.last = String(last);
    this.canvas.dataset.total = String(this.total);
    this.canvas.dataset.active = String(this.buckets.slice(0, WINDOW - 1).filter((n) => n > 0).length);
    this.onTick(last);
    this.draw();
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (width === 0 || height === 0) return;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    const style = getComputedStyle(canvas);
    const colour = (name, fallback) => style.getPropertyValue(name).trim() || fallback;
    const bar = colour("--chart-bar", "#2563eb");
    const barNow = colour("--chart-bar-now", "#93c5fd");
    const grid = colour("--chart-grid", "#e5e7eb");
    const text = colour("--chart-text", "#6b7280");
    const font = `11px ${style.fontFamily || "sans-serif"}`;

    const left = 34;
    const right = 6;
    const top = 8;
    const bottom = 18;
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    const max = niceMax(Math.max(...this.buckets, 1));

    // Grid lines and y labels at 0, max/2, max.
    ctx.font = font;
    ctx.fillStyle = text;
    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const f of [0, 0.5, 1]) {
      const y = Math.round(top + plotH - f * plotH) + 0.5;
      ctx.beginPath();
      ctx.moveTo(left, y);
      ctx.lineTo(width - right, y);
      ctx.stroke();
      ctx.fillText(formatCount(max * f), left - 6, y);
    }

    // One bar per second; the second in progress is lighter.
    const step = plotW / WINDOW;
    const gap = step > 4 ? 1 : 0;
    for (let i = 0; i < WINDOW; i++) {
      const n = this.buckets[i];
      if (n === 0) continue;
      const h = (n / max) * plotH;
      ctx.fillStyle = i === WINDOW - 1 ? barNow : bar;
      ctx.fillRect(left + i * step + gap / 2, top + plotH - h, Math.max(step - gap, 1), h);
    }

    // x labels.
    ctx.fillStyle = text;
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "left";
    ctx.fillText("60 s ago", left, height - 4);
    ctx.textAlign = "right";
    ctx.fillText("now", width - right, height - 4);
  }
}

/** A round axis maximum at or above `n`: 1, 2, 5, 10, 20, 50, ... */
function niceMax(n) {
  const p = 10 ** Math.floor(Math.log10(n));
  for (const m of [1, 2, 5, 10]) if (m * p >= n) return m * p;
  return 10 * p;
}

function formatCount(n) {
  if (n >= 1000) return `${Math.round(n / 100) / 10}k`;
  return String(Math.round(n * 10) / 10);
}
