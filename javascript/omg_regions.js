// OMG regions: draw one box per concept on a canvas the shape of the image.
// The boxes go, in image pixels, into the "Regions" textbox (#omg_regions) as
// {"width": W, "height": H, "boxes": {"1": [x0, y0, x1, y1], ...}} and an "input" event
// tells gradio (3.41 and 4.40 alike). A value set from Python (pasted infotext, an
// uploaded mask image) is drawn back. The WebUIs load this file into the page; the
// colours are the mask overlay's (omg_ext/masks.py), so a concept looks the same in both.
// Every canvas (class "omg-regions-canvas": the accordion's in txt2img and img2img, the
// extraction tab's) names its textbox in data-textbox and the tab whose width and height it
// takes in data-tab; with data-fixed it keeps data-width x data-height (a picture's size)
// and draws the <img> it holds under the boxes.
(function () {
    const COLOURS = ["#ff4040", "#3380ff", "#40d94d", "#ffcc1a", "#bf4dff"];
    const LONG_SIDE = 320;

    function textbox(host) {
        const id = host.dataset.textbox || "omg_regions";
        return document.querySelector(`#${id} textarea, #${id} input`);
    }

    function imageSize(host) {
        if (host.dataset.fixed) return [Number(host.dataset.width), Number(host.dataset.height)];
        const tab = host.dataset.tab || "txt2img";
        const w = document.querySelector(`#${tab}_width input[type=number]`);
        const h = document.querySelector(`#${tab}_height input[type=number]`);
        if (w && h && Number(w.value) > 0 && Number(h.value) > 0) return [Number(w.value), Number(h.value)];
        return [Number(host.dataset.width) || 512, Number(host.dataset.height) || 512];
    }

    function parse(text) {
        try {
            const data = JSON.parse(text);
            return data && typeof data === "object" ? data : null;
        } catch (e) {
            return null;
        }
    }

    function setup(host) {
        if (host.dataset.omgReady) return;
        host.dataset.omgReady = "1";
        const state = {concept: 1, boxes: {}, drag: null, size: imageSize(host), seen: null};
        const bar = document.createElement("div");
        bar.className = "omg-regions-bar";
        const buttons = COLOURS.map((colour, i) => {
            const b = document.createElement("button");
            b.type = "button";
            b.textContent = String(i + 1);
            b.dataset.concept = String(i + 1);
            b.style.cssText = `border:3px solid ${colour};margin:2px;padding:2px 10px;border-radius:4px;cursor:pointer`;
            b.onclick = () => { state.concept = i + 1; paintButtons(); };
            bar.appendChild(b);
            return b;
        });
        const clear = document.createElement("button");
        clear.type = "button";
        clear.textContent = "Clear";
        clear.className = "omg-regions-clear";
        clear.style.cssText = "margin:2px 8px;padding:2px 10px;cursor:pointer";
        clear.onclick = () => { state.boxes = {}; write(); };
        bar.appendChild(clear);
        const canvas = document.createElement("canvas");
        canvas.style.cssText = "border:1px solid #888;cursor:crosshair;touch-action:none;background:#222";
        host.appendChild(bar);
        host.appendChild(canvas);

        function paintButtons() {
            buttons.forEach((b, i) => { b.style.background = i + 1 === state.concept ? COLOURS[i] : "transparent"; });
        }

        function fit() {
            const [w, h] = state.size;
            const scale = LONG_SIDE / Math.max(w, h);
            canvas.width = Math.round(w * scale);
            canvas.height = Math.round(h * scale);
        }

        function draw() {
            const ctx = canvas.getContext("2d");
            const sx = canvas.width / state.size[0], sy = canvas.height / state.size[1];
            ctx.clearRect(0, 0, canvas.width, canvas.height);
            const picture = host.querySelector("img");
            if (picture && picture.complete && picture.naturalWidth) ctx.drawImage(picture, 0, 0, canvas.width, canvas.height);
            const all = Object.entries(state.boxes);
            if (state.drag && state.drag.box) all.push([String(state.concept), state.drag.box]);
            for (const [concept, [x0, y0, x1, y1]] of all) {
                const colour = COLOURS[(Number(concept) - 1) % COLOURS.length];
                ctx.fillStyle = colour + "55";
                ctx.strokeStyle = colour;
                ctx.lineWidth = 2;
                ctx.fillRect(x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy);
                ctx.strokeRect(x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy);
                ctx.fillStyle = colour;
                ctx.font = "bold 14px sans-serif";
                ctx.fillText(concept, x0 * sx + 4, y0 * sy + 16);
            }
        }

        function write() {
            const box = textbox(host);
            if (!box) return;
            const [width, height] = state.size;
            box.value = Object.keys(state.boxes).length ? JSON.stringify({width, height, boxes: state.boxes}) : "";
            state.seen = box.value;
            box.dispatchEvent(new Event("input", {bubbles: true}));
            draw();
        }

        function toImage(event) {
            const rect = canvas.getBoundingClientRect();
            const x = (event.clientX - rect.left) / rect.width * state.size[0];
            const y = (event.clientY - rect.top) / rect.height * state.size[1];
            return [Math.min(Math.max(x, 0), state.size[0]), Math.min(Math.max(y, 0), state.size[1])];
        }

        canvas.addEventListener("pointerdown", (event) => {
            state.drag = {start: toImage(event), box: null};
            canvas.setPointerCapture(event.pointerId);
        });
        canvas.addEventListener("pointermove", (event) => {
            if (!state.drag) return;
            const [x, y] = toImage(event), [x0, y0] = state.drag.start;
            state.drag.box = [Math.min(x, x0), Math.min(y, y0), Math.max(x, x0), Math.max(y, y0)].map(Math.round);
            draw();
        });
        canvas.addEventListener("pointerup", () => {
            const box = state.drag && state.drag.box;
            state.drag = null;
            if (box && box[2] > box[0] && box[3] > box[1]) {
                state.boxes[String(state.concept)] = box;
                write();
            } else {
                draw();
            }
        });

        // Follow the value when Python sets it, and the image size while nothing is drawn.
        setInterval(() => {
            const box = textbox(host);
            const size = imageSize(host);
            if (box && box.value !== state.seen) {
                state.seen = box.value;
                const data = parse(box.value);
                state.boxes = data && data.boxes ? {...data.boxes} : {};
                if (data && data.width > 0 && data.height > 0) state.size = [data.width, data.height];
                fit();
                draw();
            } else if (!Object.keys(state.boxes).length && (size[0] !== state.size[0] || size[1] !== state.size[1])) {
                state.size = size;
                fit();
                draw();
            }
        }, 300);
        const picture = host.querySelector("img");
        if (picture) picture.addEventListener("load", draw);
        paintButtons();
        fit();
        draw();
    }

    function scan() {
        document.querySelectorAll("#omg_regions_canvas, .omg-regions-canvas").forEach(setup);
    }

    if (typeof onUiLoaded === "function") onUiLoaded(scan);
    new MutationObserver(scan).observe(document.documentElement, {childList: true, subtree: true});
    scan();
})();
