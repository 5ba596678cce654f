class SdConditioning(list):
    """A list of prompts with the image size, as A1111's ``prompt_parser.SdConditioning``."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__(prompts)
        self.is_negative_prompt, self.width, self.height = is_negative_prompt, width, height
