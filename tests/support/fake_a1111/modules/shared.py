class State:
    """The fields of ``modules.shared_state.State`` the adapter uses."""

    interrupted = False
    skipped = False
    job_count = 0
    job_no = 0
    sampling_step = 0

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0


state = State()
