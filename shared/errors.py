"""The error every input check raises: an API error code, a message for people, an HTTP status."""


class InputRefused(ValueError):
    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status
