"""The widgets end to end in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
selenium; nothing is downloaded at run time) opens a JupyterLab that this test starts on loopback, runs a notebook
showing `PromptSession` on a real image (DSB2018) and `DatasetViewer` on the sample world, clicks on a nucleus /
drags the slider like a user, and checks that the displayed picture changes. Screenshots go to the test's tmp folder
(their paths are printed). Skips, saying why, where Chromium, its driver, selenium or the real image is missing."""
import json, os, shutil, signal, socket, subprocess, sys, time, urllib.request, uuid
from pathlib import Path
import numpy as np
import nbformat, pytest
from ullsam_nb.basics import shared_data_dir
from ullsam_nb.data import shared_dsb2018_pairs

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver") or next((p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if Path(p).exists()), None)
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("Chromium or its driver is not installed (Debian: `apt-get install chromium chromium-driver`; "
                "`.ci/run` installs them where it runs as root): browser test skipped", allow_module_level=True)
pytest.importorskip("selenium", reason="selenium is not installed (`pip install -e .[dev]` brings it): browser test skipped")
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

TIMEOUT = 240   # seconds for each wait: a cold kernel imports torch and builds the model on a loaded CPU

SETUP = """\
from ullsam_nb.widgets import PromptSession, DatasetViewer
from ullsam_nb.synth import sample_world_dir"""
PROMPT_CELL = """\
from ullsam_nb.data import shared_dsb2018_pairs, load_pairs
from ullsam_nb.sam import build_sam
(sample,), _ = load_pairs(shared_dsb2018_pairs())
session = PromptSession(build_sam(), sample.image, scale=1)   # the default model, on the real DSB2018 nuclei image
session.widget.add_class("e2e-prompt")
session.widget"""
VIEWER_CELL = """\
viewer = DatasetViewer(sample_world_dir())
viewer.widget.add_class("e2e-viewer")
viewer.widget"""

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def _wait(what, fn, timeout=TIMEOUT, every=0.5):
    "Poll `fn` until it returns something truthy; fail naming `what` after `timeout` seconds."
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try: v = fn()
        except Exception: v = None
        if v: return v
        time.sleep(every)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")

def _settings(root:Path):
    "JupyterLab settings for a quiet, deterministic page: no news/update toasts, every cell rendered (no windowing)."
    for plugin, value in {"@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
                          "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"}}.items():
        f = root/f"{plugin}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True); f.write_text(json.dumps(value))

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    "A JupyterLab on 127.0.0.1 (token auth, CPU-only kernels) with the widgets notebook open and run, in headless Chromium."
    root = tmp_path_factory.mktemp("lab")
    has_real = bool(shared_dsb2018_pairs())
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in [SETUP] + ([PROMPT_CELL] if has_real else []) + [VIEWER_CELL]]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root/"widgets_e2e.ipynb")
    _settings(root/"settings")
    port, token = _free_port(), uuid.uuid4().hex
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ULLSAM_CACHE_DIR": str(root/"cache"), "JUPYTER_RUNTIME_DIR": str(root/"runtime")}
    env.pop("MPLBACKEND", None)
    if shared_data_dir() is not None: env["ULLSAM_SHARED_DATA"] = str(shared_data_dir())
    log = open(root/"jupyterlab.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                               "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
                               f"--LabApp.user_settings_dir={root/'settings'}", f"--LabApp.workspaces_dir={root/'workspaces'}",
                               "--LabApp.expose_app_in_browser=True"] + (["--allow-root"] if os.geteuid() == 0 else []), cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    driver = None
    try:
        def answers():
            if server.poll() is not None: pytest.fail(f"JupyterLab exited ({server.returncode}):\n{(root/'jupyterlab.log').read_text()[-2000:]}")
            return urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5).status == 200
        _wait("JupyterLab to answer on loopback", answers, timeout=120)
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1300,1400"):
            opts.add_argument(a)
        os.environ.setdefault("SE_OFFLINE", "true")          # never let selenium try to fetch a driver or a browser
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
        driver.get(f"{base}/lab/tree/widgets_e2e.ipynb?token={token}")
        kernel_idle = ("const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                       "const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;"
                       "return !!(k && k.status === 'idle' && w.content && w.content.widgets.length > 0);")
        _wait("the notebook and its kernel in JupyterLab", lambda: driver.execute_script(kernel_idle))
        driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
        yield dict(driver=driver, root=root, has_real=has_real, log=root/"jupyterlab.log")
    finally:
        if driver is not None: driver.quit()
        try: urllib.request.urlopen(urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST"), timeout=10)
        except Exception: pass
        try: server.wait(30)
        except subprocess.TimeoutExpired: server.terminate(); server.wait(30)
        log.close()

def _find(driver, css):
    els = driver.find_elements(By.CSS_SELECTOR, css)
    return els[0] if els else None

def _loaded_image(driver, css):
    "The <img> under `css` once its PNG has loaded."
    img = _find(driver, css)
    return img if img is not None and driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0;", img) else None

def _errors(driver) -> str:
    "Error outputs of the notebook, if any (to fail with the kernel's message rather than a timeout)."
    return "\n".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"))

def _wait_widget(lab, css, what):
    d = lab["driver"]
    def ready():
        if "Traceback" in _errors(d) or "Error" in _errors(d): pytest.fail(f"the notebook failed in the browser:\n{_errors(d)[-3000:]}")
        return _loaded_image(d, css)
    img = _wait(what, ready)
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", img)
    time.sleep(0.5)
    return img

def _kernel_eval(driver, expr:str) -> str:
    "Evaluate `expr` in the notebook's kernel through JupyterLab's own kernel connection; its printed value."
    js = """const [code, done] = arguments; const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
            let out = ''; const f = k.requestExecute({code, silent: false, store_history: false});
            f.onIOPub = m => { if (m.header.msg_type === 'stream') out += m.content.text; };
            f.done.then(() => done(out), e => done('error: ' + e));"""
    driver.set_script_timeout(60)
    return driver.execute_async_script(js, f"print({expr})").strip()

def _click_target(mask_path) -> tuple:
    "A point well inside the largest nucleus of the DSB2018 mask (image pixels x, y), and that nucleus' id."
    from scipy import ndimage as ndi
    from ullsam_nb.io import read_labels
    labels = read_labels(mask_path)
    ids, sizes = np.unique(labels[labels > 0], return_counts=True)
    k = int(ids[np.argmax(sizes)])
    dist = ndi.distance_transform_edt(labels == k)
    y, x = np.unravel_index(np.argmax(dist), dist.shape)
    return int(x), int(y), k

def test_prompt_session_click_changes_the_mask(lab):
    if not lab["has_real"]: pytest.skip("the real DSB2018 image (shared/data/dsb2018) is absent: PromptSession browser test skipped")
    d, root = lab["driver"], lab["root"]
    img = _wait_widget(lab, ".e2e-prompt img.widget-image", "PromptSession's image in the browser")
    status = lambda: _find(d, ".e2e-prompt .widget-html").text
    assert "0 positive" in status(), status()
    before = img.screenshot_as_png
    (root/"prompt_before.png").write_bytes(before)
    x, y, nucleus = _click_target(shared_dsb2018_pairs()[0].mask_path)
    w, h = img.size["width"], img.size["height"]
    nat_w, nat_h = d.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight];", img)
    if "ipyevents" in status():                    # the real click path: a mouse click on the picture
        ox, oy = (x + 0.5) * w / nat_w - w / 2, (y + 0.5) * h / nat_h - h / 2
        ActionChains(d).move_to_element_with_offset(img, ox, oy).click().perform()
        how = f"clicked the picture at image pixel ({x}, {y}), inside DSB2018 nucleus {nucleus} (screen offset {ox:+.0f}, {oy:+.0f} px from its centre)"
    else:                                          # without ipyevents: type the point and press "add point"
        boxes = d.find_elements(By.CSS_SELECTOR, ".e2e-prompt .widget-text input")
        for box, v in zip(boxes[:2], (x, y)):
            box.send_keys(Keys.CONTROL, "a"); box.send_keys(str(v), Keys.ENTER)
        _wait("the x/y boxes to reach the kernel", lambda: _kernel_eval(d, "(session.x_box.value, session.y_box.value)") == str((x, y)))
        button = next(b for b in d.find_elements(By.CSS_SELECTOR, ".e2e-prompt button") if b.text == "add point")
        ActionChains(d).move_to_element(button).click().perform()
        how = (f"typed image pixel ({x}, {y}), inside DSB2018 nucleus {nucleus}, into the x/y boxes and clicked 'add point' "
               "(ipyevents is not installed, so the picture itself takes no clicks)")
    _wait("the mask after the click", lambda: "1 positive" in status() and "mask" in status())
    after = _wait("the displayed picture to change", lambda: (s := img.screenshot_as_png) != before and s)
    (root/"prompt_after.png").write_bytes(after)
    point = json.loads(_kernel_eval(d, "__import__('json').dumps(session.points.tolist())"))[0]
    assert abs(point[0] - x) <= 2 and abs(point[1] - y) <= 2, f"the click landed at image pixel {point}, not ({x}, {y})"
    shot = root/"prompt_session.png"; d.save_screenshot(str(shot))
    a, b = (np.asarray(_png(p), float) for p in (before, after))
    changed = float((np.abs(a - b).sum(-1) > 30).mean())
    print(f"\nPromptSession: {how}; the kernel got the point ({point[0]:.1f}, {point[1]:.1f})\n  status: {status()}\n  {changed:.1%} of the displayed pixels changed"
          f"\n  screenshot: {shot}\n  picture before/after: {root/'prompt_before.png'}, {root/'prompt_after.png'}")
    assert changed > 0.002, f"the picture hardly changed ({changed:.2%} of pixels)"

def test_dataset_viewer_slider_changes_the_image(lab):
    d, root = lab["driver"], lab["root"]
    img = _wait_widget(lab, ".e2e-viewer img.widget-image", "DatasetViewer's image in the browser")
    readout = lambda: _find(d, ".e2e-viewer .widget-readout").text
    first, before = readout(), img.screenshot_as_png
    handle = _find(d, ".e2e-viewer .noUi-handle")
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", handle)
    ActionChains(d).click_and_hold(handle).move_by_offset(60, 0).release().perform()
    _wait("the slider to move", lambda: readout() != first)
    info = lambda: _find(d, ".e2e-viewer .widget-html").text
    _wait("the viewer to show the image the slider points at", lambda: f"({int(readout()) + 1}/" in info(), every=1.0)
    after = _wait("the viewer's picture to change", lambda: (s := img.screenshot_as_png) != before and s)
    shot = root/"dataset_viewer.png"; d.save_screenshot(str(shot))
    print(f"\nDatasetViewer: dragged the slider from {first} to {readout()}; now showing: {info().splitlines()[0]}\n  screenshot: {shot}")
    assert after != before

def _png(data:bytes):
    from PIL import Image
    import io
    return Image.open(io.BytesIO(data)).convert("RGB")
