class State:
    """The fields of ``modules.shared_state.State`` the adapter uses."""

    interrupted = False
    skipped = False
    job_count = 0
    job_no = 0
    sampling_step = 0
    sampling_steps = 0
    textinfo = None
    """Set by the samplers' step callback in the WebUI; by the test jobs' samplers here."""

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0

    def begin(self, job="(unknown)"):
        self.interrupted, self.skipped, self.job, self.textinfo = False, False, job, None

    def end(self):
        self.job = ""

    def interrupt(self):
        self.interrupted = True


state = State()


class Options:
    """``shared.opts``: the settings the adapter reads, by key, in ``data``."""

    def __init__(self):
        self.data = {}


opts = Options()


class TotalTQDM:
    """``shared.total_tqdm``: the console's "Total progress" bar; ``_tqdm`` exists once the host set its total."""

    def __init__(self):
        self._tqdm = None


total_tqdm = TotalTQDM()


class CmdOpts:
    """``shared.cmd_opts``: the folders the WebUI was started with."""

    lora_dir = ""
    embeddings_dir = ""


cmd_opts = CmdOpts()
sd_model = None
"""The loaded checkpoint, set by a test."""
